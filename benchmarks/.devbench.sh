lscpu | egrep 'Model name|^CPU\(s\)'; lscpu | grep -o 'avx512f' | head -1
python -c "import torch, numpy, sys; print(sys.version.split()[0], torch.__version__, numpy.__version__)"
export PYTHONPATH=python
python -c "import lmlab; print(lmlab.cpu_info())"
taskset -c 0,1 python -m lmlab bench train --threads 2 --steps 30 --warmup 5 --profile
taskset -c 0,1 python -m lmlab bench train --n-layer 6 --n-head 6 --n-embd 384 --block-size 256 --batch-size 16 --threads 2 --steps 4 --warmup 1 --profile
