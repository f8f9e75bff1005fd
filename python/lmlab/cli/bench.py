"""The `lmlab bench` verb: kernels, training and generation measured against references in the
same run."""

from __future__ import annotations

from .. import bench, trainbench


def add_commands(sub) -> None:
    p = sub.add_parser("bench", help="measure kernels or training against references in the same run")
    bsub = p.add_subparsers(dest="bench_what", required=True, metavar="{kernels,train,generate}")
    k = bsub.add_parser("kernels", help="every kernel vs numpy (and PyTorch) in the same run")
    bench.add_bench_kernels_arguments(k)
    k.set_defaults(func=bench.run_bench_kernels)
    t = bsub.add_parser("train", help="training tokens/s and peak memory vs PyTorch, same config")
    trainbench.add_bench_train_arguments(t)
    t.set_defaults(func=trainbench.run_bench_train)
    g = bsub.add_parser("generate", help="generation tokens/s with the KV cache vs without")
    trainbench.add_bench_generate_arguments(g)
    g.set_defaults(func=trainbench.run_bench_generate)
