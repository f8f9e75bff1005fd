"""Teaching views over a trained model: `demo loss`, `demo sampling`, `demo embeddings` (`demo training`
lives in demo_training.py).

Each view takes a run directory (loaded with lmlab.checkpoint.load_model) or a (model, tokenizer)
pair, draws PNGs into an output directory and returns a DemoResult with every number it showed.

loss:        for each position of a text, the probability the model gave the right next token and
             its cross-entropy -log p; their mean is the loss training minimises
sampling:    the next-token distribution for a prompt, reshaped by temperature, top-k and top-p,
             and samples with different seeds (and one seed twice: the same text)
embeddings:  the nearest tokens to one token by cosine similarity of wte rows, and a 2-D PCA map
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .demo_common import (
    DemoResult,
    SettingValueError,
    ansi_background,
    check_float,
    check_int,
    clip_text,
    confidence_rgb,
    format_table,
    new_figure,
    out_dir,
    quoted_label,
    save_gif,
    save_png,
    token_label,
    use_colour,
    write_text,
)
from .sample import score_tokens


def resolve_model(source):
    """(model, tokenizer) from a run directory or an existing (model, tokenizer) pair."""
    if isinstance(source, (tuple, list)) and len(source) == 2:
        model, tokenizer = source
        if not hasattr(model, "forward") or not hasattr(tokenizer, "encode"):
            raise TypeError("source must be a run directory or a (model, tokenizer) pair, got a pair of "
                            f"({type(model).__name__}, {type(tokenizer).__name__})")
        return model, tokenizer
    if isinstance(source, (str, os.PathLike)):
        from .checkpoint import load_model

        model, tokenizer, _ = load_model(source)
        return model, tokenizer
    raise TypeError(f"source must be a run directory or a (model, tokenizer) pair, got {type(source).__name__}")


def _piece(tokenizer, i: int) -> str:
    return tokenizer.decode(np.array([i], np.int32))


def _rgb01(p: float) -> tuple[float, float, float]:
    return tuple(c / 255 for c in confidence_rgb(p))


# ---------------------------------------------------------------------------------------------
# loss of a model on a text


def token_losses(model, tokenizer, text: str) -> dict:
    """For each position of `text`: the probability the model gives the right next token, its
    cross-entropy -log p (float64), the model's own per-token loss, and its top guess with that
    guess's probability. Keys: ids, targets, probs, ce, model_losses, top_guess, top_guess_p.

    A text longer than the model's block_size + 1 tokens is scored in consecutive windows of
    block_size predictions, the context starting afresh in each (as training batches do).
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be str, got {type(text).__name__}")
    ids = np.asarray(tokenizer.encode(text, name="text"), np.int32)
    if ids.size < 2:
        raise SettingValueError("text", f"must encode to at least 2 tokens (one to read, one to predict), got {ids.size}")
    logp, model_losses = score_tokens(model, ids)  # (N-1, V) float64, and the model's own losses
    right = logp[np.arange(ids.size - 1), ids[1:]]
    return {"ids": ids, "targets": ids[1:], "probs": np.exp(right), "ce": -right,
            "model_losses": model_losses, "top_guess": np.argmax(logp, axis=-1),
            "top_guess_p": np.exp(logp.max(axis=-1))}


def loss(source, text: str, out, *, colour: bool | None = None) -> DemoResult:
    """Per-position probability of the right next token and its cross-entropy on `text`, drawn
    (the numbers come from token_losses)."""
    model, tokenizer = resolve_model(source)
    out = out_dir(out)
    scored = token_losses(model, tokenizer, text)
    ids, targets, probs, ce = scored["ids"], scored["targets"], scored["probs"], scored["ce"]
    model_losses, guess, guess_p = scored["model_losses"], scored["top_guess"], scored["top_guess_p"]
    pieces = [_piece(tokenizer, int(i)) for i in ids]
    mean_ce = float(ce.mean())

    # the figure: probability of the right token, then -log p with its mean
    n = targets.size
    fig = new_figure(min(max(8.0, 0.32 * n + 2.5), 26.0), 6.6)
    ax_p, ax_ce = fig.subplots(2, 1, sharex=True)
    pos = np.arange(n)
    bar_colours = [_rgb01(p) for p in probs]
    ax_p.bar(pos, probs, color=bar_colours, edgecolor="0.3", linewidth=0.4)
    ax_p.set_ylim(0, 1)
    ax_p.set_ylabel("p(right next token)")
    ax_p.set_title(f"How sure was the model of each next token?  (green = sure and right, red = surprised; "
                   f"{n} predictions)", fontsize=11)
    ax_ce.bar(pos, ce, color=bar_colours, edgecolor="0.3", linewidth=0.4)
    ax_ce.axhline(mean_ce, color="black", ls="--", lw=1.2, label=f"mean = the loss = {mean_ce:.3f}")
    ax_ce.axhline(np.log(tokenizer.vocab_size), color="0.5", ls=":", lw=1,
                  label=f"uniform guess: log V = {np.log(tokenizer.vocab_size):.2f}")
    ax_ce.set_ylabel("cross-entropy \u2212log p")
    ax_ce.set_xlabel("the token to predict at each position")
    ax_ce.legend(fontsize=8, loc="upper right")
    every = max(1, n // 60)
    ax_ce.set_xticks(pos[::every])
    ax_ce.set_xticklabels([token_label(pieces[i + 1]) for i in pos[::every]], fontsize=8,
                          rotation=90 if max(len(pieces[i + 1]) for i in pos) > 2 else 0)
    files = {"figure": save_png(fig, out / "loss.png")}

    # the terminal: the text coloured token by token, then a table
    coloured = use_colour(colour)
    strip = [token_label(pieces[0], for_plot=False)]
    for i in range(n):
        shown = token_label(pieces[i + 1], for_plot=False)
        strip.append(ansi_background(shown, confidence_rgb(probs[i])) if coloured else shown)
    legend = ("colours: " + " ".join(ansi_background(f" p={p:.1f} ", confidence_rgb(p)) for p in (0.0, 0.25, 0.5, 0.75, 1.0))
              if coloured else "(no colours: the table gives each p)")
    rows = [[i + 1, repr(pieces[i + 1]), float(probs[i]), float(ce[i]), repr(_piece(tokenizer, int(guess[i]))),
             float(guess_p[i])] for i in range(n)]
    header = ["pos", "right token", "p", "-log p", "model's top guess", "its p"]
    summary = f"\n  mean -log p = {mean_ce:.4f}  (the model's own loss on this text: {model_losses.mean():.4f})"
    full_table = format_table(header, rows) + summary
    if n > 60:  # a long text: print its 30 most surprising predictions; loss.txt keeps them all
        worst = sorted(np.argsort(-ce, kind="stable")[:30].tolist())
        table_part = format_table(header, [rows[i] for i in worst]) + f"\n  (the 30 most surprising of {n}; all in loss.txt)"
    else:
        table_part = format_table(header, rows)
    table = "".join(strip) + "\n" + legend + "\n\n" + table_part + summary
    explanation = (
        "The loss of a real model on a real sentence. At every position the model gives a probability\n"
        "to every token it knows; training knows the right next token, and its loss there is -log p of\n"
        "that token: 0 when the model was sure and right, large when it gave the right token little\n"
        "probability. The mean over all positions is the number training drives down; a model that\n"
        f"guessed uniformly would score log V = {np.log(tokenizer.vocab_size):.3f}.\n"
        f"  {n} predictions, mean -log p = {mean_ce:.4f}, perplexity exp(loss) = {np.exp(mean_ce):.2f}"
    )
    plain = "".join(token_label(p, for_plot=False) for p in pieces)
    files["text"] = write_text(out / "loss.txt", explanation + "\n\n" + plain + "\n\n" + full_table + "\n")
    numbers = {"ids": ids, "targets": targets, "probs": probs, "ce": ce, "mean_ce": mean_ce,
               "model_loss": float(model_losses.mean()), "top_guess": guess, "top_guess_p": guess_p}
    return DemoResult("loss", files, numbers, explanation, table)


# ---------------------------------------------------------------------------------------------
# next-token distribution and sampling


def prompt_ids(tokenizer, prompt: str) -> np.ndarray:
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be str, got {type(prompt).__name__}")
    ids = np.asarray(tokenizer.encode(prompt, name="prompt"), np.int32)
    # an empty prompt starts where every training document starts: after <|endoftext|>
    return ids if ids.size else np.array([tokenizer.eot_id], np.int32)


MAX_SAMPLES = 100  # each sample is a line of the picture; 10**30 ran (sampling) for ever


def sampling(source, prompt: str, out, *, temperatures=(0.5, 1.5), top_k: int = 5, top_p: float = 0.9,
             show: int = 15, samples: int = 4, seed: int = 0, max_new_tokens: int = 40,
             gif: bool = True) -> DemoResult:
    """The next-token distribution after `prompt`, reshaped by temperature / top-k / top-p, and samples.

    With gif, sampling_generation.gif replays the first sample token by token: the distribution
    at each step, the token drawn, the text growing.
    """
    from .sample import filter_logits, generate, next_token_logits

    model, tokenizer = resolve_model(source)
    temps = [check_float("temperatures", t, positive=True) for t in temperatures]
    top_k = check_int("top_k", top_k, 1)
    top_p = check_float("top_p", top_p)
    if not 0 < top_p <= 1:
        raise SettingValueError("top_p", f"must be in (0, 1], got {top_p}")
    show = check_int("show", show, 1)
    samples = check_int("samples", samples, 1, MAX_SAMPLES)
    seed = check_int("seed", seed, 0)
    max_new_tokens = check_int("max_new_tokens", max_new_tokens, 1)
    out = out_dir(out)
    ids = prompt_ids(tokenizer, prompt)

    # Shaped from the logits as generate shapes them, so each panel is what a draw with that
    # setting draws from (from the probabilities, a token the softmax rounded to 0 stayed 0).
    logits = next_token_logits(model, ids)
    probs = filter_logits(logits)
    V = probs.size
    panels = [("the model's distribution (temperature 1)", "raw", probs)]
    for t in temps:
        panels.append((f"temperature {t:g}" + (": sharper" if t < 1 else ": flatter" if t > 1 else ""),
                       f"temperature={t:g}", filter_logits(logits, t, None, None)))
    panels.append((f"top-k, k = {top_k}: only the {top_k} likeliest", f"top_k={top_k}",
                   filter_logits(logits, 1.0, top_k, None)))
    panels.append((f"top-p, p = {top_p:g}: the likeliest, up to mass {top_p:g}", f"top_p={top_p:g}",
                   filter_logits(logits, 1.0, None, top_p)))
    # by logit: tokens whose probability underflowed to 0 still come in the model's order
    order = np.argsort(-logits, kind="stable")[: min(show, V)]
    labels = [token_label(_piece(tokenizer, int(i))) for i in order]

    fig = new_figure(3.4 * len(panels), 5.0)
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    for ax, (title, _, dist) in zip(axes, panels):
        kept = dist[order] > 0
        ax.barh(np.arange(order.size), dist[order], color=np.where(kept, "tab:blue", "0.8"))
        ax.set_title(f"{title}\nkeeps {int(np.count_nonzero(dist))} of {V} tokens", fontsize=9)
        ax.set_xlabel("probability")
        ax.set_xlim(0, max(1e-9, float(np.max([d[order].max() for _, _, d in panels]))) * 1.08)
        ax.grid(True, axis="x", alpha=0.3)
    axes[0].set_yticks(np.arange(order.size))
    axes[0].set_yticklabels(labels, fontsize=9)
    axes[0].invert_yaxis()
    axes[0].set_ylabel(f"the {order.size} likeliest next tokens")
    fig.suptitle(f"What comes after {quoted_label(prompt[-40:] if prompt else '<|endoftext|>')}? "
                 "The next-token distribution and how sampling settings reshape it", fontsize=12)
    files = {"figure": save_png(fig, out / "sampling.png")}

    def sample(s, temperature=1.0):
        return tokenizer.decode(generate(model, ids, max_new_tokens, temperature=temperature, seed=s))

    texts = [(f"seed {s}", sample(s)) for s in range(seed, seed + samples)]
    repeat = sample(seed)
    texts.append((f"seed {seed} again", repeat))
    greedy = sample(None, temperature=0.0)
    texts.append(("greedy (temperature 0)", greedy))

    fig = new_figure(11, 0.9 + 0.62 * len(texts))
    ax = fig.subplots()
    ax.axis("off")
    ax.set_title(f"Samples from the same prompt {quoted_label(prompt[-40:])} (temperature 1)", fontsize=11, loc="left")
    for row, (name, t) in enumerate(texts):
        y = 1 - (row + 0.5) / len(texts)
        ax.text(0.0, y, name, fontsize=9, fontweight="bold", va="center", transform=ax.transAxes)
        ax.text(0.2, y, clip_text(t, 110), fontsize=9, family="monospace", va="center", transform=ax.transAxes)
    files["samples"] = save_png(fig, out / "sampling_samples.png")

    steps = None
    if gif:
        new_ids = np.asarray(generate(model, ids, max_new_tokens, temperature=1.0, seed=seed), np.int32)
        files["animation"], steps = _generation_gif(model, tokenizer, ids, new_ids, out / "sampling_generation.gif")

    rows = [[i + 1, repr(_piece(tokenizer, int(t))), *[float(d[t]) for _, _, d in panels]] for i, t in enumerate(order)]
    table = (format_table(["rank", "token", *[key for _, key, _ in panels]], rows)
             + "\n  sums: " + ", ".join(f"{key} {d.sum():.6f}" for _, key, d in panels)
             + "\n\n" + "\n".join(f"  {name:>22}: {t!r}" for name, t in texts))
    same = repeat == texts[0][1]
    explanation = (
        "The next-token distribution and sampling. For the prompt, the model gives every one of its\n"
        f"{V} tokens a probability. Generation picks one, appends it and asks again. Sampling settings\n"
        "reshape the distribution before the pick: temperature < 1 sharpens it (towards the top token),\n"
        "> 1 flattens it; top-k keeps only the k likeliest tokens; top-p keeps the likeliest tokens until\n"
        "their probabilities add up to p. Whatever is kept is renormalised to sum to 1.\n"
        "Different seeds draw different random numbers, so they give different texts; the same seed\n"
        f"gives the same text (seed {seed} twice: {'identical' if same else 'DIFFERENT - a bug'}).\n"
        "Greedy decoding (temperature 0) always takes the top token and needs no seed."
    )
    files["text"] = write_text(out / "sampling.txt", explanation + "\n\n" + table + "\n")
    numbers = {"prompt_ids": ids, "logits": logits, "probs": probs, "distributions": {key: d for _, key, d in panels},
               "kept": {key: int(np.count_nonzero(d)) for _, key, d in panels}, "top_ids": order,
               "samples": texts, "repeat_identical": same, "greedy": greedy, "generation_steps": steps}
    return DemoResult("sampling", files, numbers, explanation, table)


def _generation_gif(model, tokenizer, prompt_ids, new_ids, path: Path, max_frames: int = 24, show: int = 10):
    """Frames of generation: the distribution for the next token, the token drawn, the text so far."""
    from .sample import next_token_distribution

    steps = []
    for i in range(min(max_frames, new_ids.size)):
        dist = np.asarray(next_token_distribution(model, np.concatenate([prompt_ids, new_ids[:i]])), np.float64)
        chosen = int(new_ids[i])
        steps.append({"probs": dist, "chosen": chosen, "p_chosen": float(dist[chosen])})
    if not steps:
        raise ValueError("the model produced no tokens to animate")

    fig = new_figure(9, 5.2)
    ax_text, ax = fig.subplots(2, 1, gridspec_kw={"height_ratios": [1.0, 3.0]})
    ax_text.axis("off")
    prompt_text = tokenizer.decode(prompt_ids)

    def update(k):
        step = steps[k]
        top = np.argsort(-step["probs"], kind="stable")[:show].tolist()
        if step["chosen"] not in top:
            top[-1] = step["chosen"]  # the drawn token is always on the chart, even when unlikely
        ax.clear()
        colours = ["tab:orange" if t == step["chosen"] else "tab:blue" for t in top]
        ax.barh(np.arange(len(top)), step["probs"][top], color=colours)
        ax.set_yticks(np.arange(len(top)))
        ax.set_yticklabels([token_label(_piece(tokenizer, t)) for t in top], fontsize=9)
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_xlabel("probability of being the next token")
        ax.set_title(f"step {k + 1}: the model's distribution; the random draw picked "
                     f"{quoted_label(_piece(tokenizer, step['chosen']))} (p = {step['p_chosen']:.2f}, orange)",
                     fontsize=10)
        ax_text.clear()
        ax_text.axis("off")
        so_far = tokenizer.decode(new_ids[: k + 1])
        ax_text.text(0.0, 0.75, "prompt: " + clip_text(prompt_text[-60:], 70), fontsize=9, transform=ax_text.transAxes)
        ax_text.text(0.0, 0.3, "generated: " + clip_text(so_far[-70:], 80), fontsize=10, family="monospace",
                     color="tab:blue", transform=ax_text.transAxes)
        return []

    return save_gif(fig, update, len(steps), path, fps=2.0), steps


# ---------------------------------------------------------------------------------------------
# embeddings


def token_id(tokenizer, token) -> int:
    """The id of one token given by its text (or an int id); ValueError when the text is several tokens."""
    if isinstance(token, (int, np.integer)) and not isinstance(token, bool):
        if not 0 <= int(token) < tokenizer.vocab_size:
            raise ValueError(f"token id must be in [0, {tokenizer.vocab_size}), got {token}")
        return int(token)
    if not isinstance(token, str):
        raise TypeError(f"token must be str or int, got {type(token).__name__}")
    ids = np.asarray(tokenizer.encode(token, allow_special=True, name="token"))
    if ids.size != 1:
        pieces = [_piece(tokenizer, int(i)) for i in ids]
        raise SettingValueError("token", f"must be exactly one token of the vocabulary; {token!r} encodes to "
                                         f"{ids.size} tokens {pieces}")
    return int(ids[0])


def embedding_rows(model, tokenizer) -> np.ndarray:
    """The token embeddings (rows of wte) as float64 (V, C), one row per token of the tokenizer."""
    # rows past the tokenizer's vocabulary (padding of the model's vocab_size) are no tokens at all
    V = min(int(tokenizer.vocab_size), int(model.config.vocab_size))
    return np.array(model.named_parameters()["wte"][:V], np.float64)


def nearest_tokens(tokenizer, wte: np.ndarray, q: int, k: int):
    """(cosine of every row with row q, the k nearest other tokens as dicts id/token/cosine)."""
    V = wte.shape[0]
    if not 0 <= q < V:
        raise ValueError(f"token id {q} has no embedding row (the model has {V})")
    norms = np.linalg.norm(wte, axis=1)
    cos = wte @ wte[q] / np.maximum(norms * norms[q], 1e-300)
    order = [int(i) for i in np.argsort(-cos, kind="stable") if i != q][: min(k, V - 1)]
    return cos, [{"id": i, "token": _piece(tokenizer, i), "cosine": float(cos[i])} for i in order]


def pca_2d(wte: np.ndarray):
    """(coords (V, 2): each row along the two directions the rows vary most, the fraction of the
    variance along every direction)."""
    centred = wte - wte.mean(axis=0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    return centred @ vt[:2].T, s**2 / np.sum(s**2)


def embeddings(source, token, out, *, k: int = 10, labels: int = 120) -> DemoResult:
    """Nearest tokens to `token` by cosine similarity of wte rows, and a labelled 2-D PCA of all rows."""
    model, tokenizer = resolve_model(source)
    k = check_int("k", k, 1)
    labels = check_int("labels", labels, 1)
    out = out_dir(out)
    wte = embedding_rows(model, tokenizer)
    V = wte.shape[0]
    q = token_id(tokenizer, token)
    cos, neighbours = nearest_tokens(tokenizer, wte, q, k)
    order = [n["id"] for n in neighbours]
    coords, explained = pca_2d(wte)

    fig = new_figure(13, 6.2)
    ax, ax_n = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.7, 1.0]})
    ax.scatter(coords[:, 0], coords[:, 1], s=10, color="0.65")
    near = set(order)
    if V <= labels:
        labelled = list(range(V))
    else:  # the query, its neighbours, and an even spread of the rest
        rest = [i for i in np.linspace(0, V - 1, labels).round().astype(int).tolist() if i != q and i not in near]
        labelled = [q, *order, *rest[: max(0, labels - 1 - len(order))]]
    for i in labelled:
        colour = "tab:red" if i == q else "tab:blue" if i in near else "0.25"
        ax.annotate(token_label(_piece(tokenizer, i)), coords[i], xytext=(0, 4), textcoords="offset points",
                    fontsize=9 if i == q or i in near else 7, color=colour, ha="center", va="bottom",
                    fontweight="bold" if i == q else "normal")
    ax.scatter(coords[order, 0], coords[order, 1], s=22, color="tab:blue", label=f"{len(order)} nearest by cosine")
    ax.scatter(coords[q, 0], coords[q, 1], s=60, color="tab:red", marker="*", label=quoted_label(_piece(tokenizer, q)))
    ax.set_xlabel(f"principal direction 1 ({100 * explained[0]:.1f}% of the variance)")
    ax.set_ylabel(f"principal direction 2 ({100 * explained[1]:.1f}% of the variance)" if explained.size > 1 else "")
    ax.set_title(f"The {V} token embeddings (rows of wte, {wte.shape[1]} numbers each) seen from their "
                 "two widest directions (PCA)", fontsize=10)
    ax.legend(fontsize=8)
    ax_n.barh(np.arange(len(order)), [n["cosine"] for n in neighbours], color="tab:blue")
    ax_n.set_yticks(np.arange(len(order)))
    ax_n.set_yticklabels([token_label(n["token"]) for n in neighbours], fontsize=9)
    ax_n.invert_yaxis()
    ax_n.set_xlim(-1, 1)
    ax_n.axvline(0, color="black", lw=0.8)
    ax_n.set_xlabel("cosine similarity (1 = same direction, 0 = unrelated)")
    ax_n.set_title(f"nearest tokens to {quoted_label(_piece(tokenizer, q))}", fontsize=10)
    files = {"figure": save_png(fig, out / "embeddings.png")}

    table = format_table(["rank", "token", "id", "cosine"],
                         [[r + 1, repr(n["token"]), n["id"], n["cosine"]] for r, n in enumerate(neighbours)])
    explanation = (
        "Embeddings. The model's first step turns each token id into a vector: a row of the matrix wte.\n"
        "Training moves these vectors so that tokens used in similar places point in similar directions,\n"
        "so the cosine of the angle between two rows says how alike the model treats them. (In an\n"
        "untrained model the rows are random and the neighbours mean nothing.) The map projects every\n"
        "row onto the two directions along which the embeddings vary most (PCA); it keeps\n"
        f"{100 * explained[:2].sum():.1f}% of their variance, so nearby points may still be far apart in full.\n"
        f"  nearest to {_piece(tokenizer, q)!r} (id {q}):"
    )
    files["text"] = write_text(out / "embeddings.txt", explanation + "\n" + table + "\n")
    numbers = {"token_id": q, "neighbours": neighbours, "cosine": cos, "coords": coords,
               "explained_variance_ratio": explained}
    return DemoResult("embeddings", files, numbers, explanation, table)
