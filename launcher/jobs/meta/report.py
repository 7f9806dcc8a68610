"""Results of `trellis meta`: results.json, a markdown table (printed and results.md) and
meta_learning.png (in-context accuracy vs k; fine-tuned accuracy vs n; train vs validation
loss of each fine-tuning run)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def key_shown_accuracy(task_yaml: Path, samples: Path, k: int, seed: int) -> dict[str, Any]:
    """Exact match of a lookup task split by whether the row's key (its input's last word)
    is the key of one of the prompt's k examples (redrawn as `trellis eval` drew them): an
    in-context learner answers the shown keys and can only guess the others."""
    from trellis.data_pipeline import eval_tasks as et

    spec = et.load_task(task_yaml)
    pool = et.load_docs(spec, spec.fewshot_split)
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    docs = et.load_docs(spec, spec.dataset)
    hits = {True: [], False: []}
    for i, (row, doc) in enumerate(zip(rows, docs)):  # samples are in row order
        shots = et.shot_indices(len(pool), k, seed, spec.name, i, False)
        shown = doc.text.split()[-1] in {pool[j].text.split()[-1] for j in shots}
        hits[shown].append(row["exact_match"])
    return {"shown": len(hits[True]) / len(rows),
            "exact_shown": _mean(hits[True]), "exact_not_shown": _mean(hits[False])}


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def table(res: dict[str, Any]) -> str:
    """Markdown: in-context exact match per task and k; fine-tuning per n."""
    ks = res["shots"]
    lines = ["In-context (the pretrained model, k examples in the prompt, no gradient step); "
             f"exact match on {res['n_eval']} held-out rows per task:", "",
             "| task | " + " | ".join(f"k={k}" for k in ks) + " |",
             "|---|" + "---|" * len(ks)]
    for task, by_k in res["in_context"].items():
        lines.append(f"| {task} | " + " | ".join(f"{by_k[str(k)]:.2f}" for k in ks) + " |")
    lines += ["", "Lookup rows whose key is among the prompt's examples (share), exact match on "
              "them / on the others:", "",
              "| task | " + " | ".join(f"k={k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
    for task, by_k in res["in_context_key_shown"].items():
        lines.append(f"| {task} | " + " | ".join(_split(by_k[str(k)]) for k in ks) + " |")
    ft = res["finetune"]
    for task, runs in ft["runs"].items():
        lines += ["", f"Fine-tuning on {task} (SFT of the same model, {ft['steps']} steps, "
                  "0 examples in the prompt); exact match on the same rows:", "",
                  "| n labelled | train (start -> end) | validation | val loss min (step) -> end |",
                  "|---|---|---|---|"]
        for n, r in runs.items():
            c = r["curves"]
            best = min(range(len(c["val_loss"])), key=c["val_loss"].__getitem__)
            lines.append(f"| {n} | {r['train_exact_start']:.2f} -> {r['train_exact']:.2f} | "
                         f"{r['val_exact']:.2f} | {c['val_loss'][best]:.3f} "
                         f"({int(c['val_step'][best])}) -> {c['val_loss'][-1]:.3f} |")
    return "\n".join(lines) + "\n"


def _split(r: dict[str, Any]) -> str:
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    return f"{r['shown']:.2f}: {fmt(r['exact_shown'])} / {fmt(r['exact_not_shown'])}"


def write(res: dict[str, Any], root: Path) -> None:
    (root / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    (root / "results.md").write_text(table(res))
    plot(res, root / "meta_learning.png")


def plot(res: dict[str, Any], out: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ft = res["finetune"]
    tasks = list(ft["runs"])
    fig, axes = plt.subplots(1, 2 + len(tasks), figsize=(5 * (2 + len(tasks)), 4.2))
    a, b = axes[0], axes[1]
    ks = res["shots"]
    for task, by_k in res["in_context"].items():
        a.plot(ks, [by_k[str(k)] for k in ks], marker="o", label=task)
    a.set(xlabel="examples in the prompt (k)", ylabel="exact match", ylim=(-0.02, 1.02),
          title="in-context (pretrained, no gradient step)")
    a.set_xticks(ks)
    for i, task in enumerate(tasks):
        ns = [int(n) for n in ft["runs"][task]]
        runs = list(ft["runs"][task].values())
        b.plot(ns, [r["val_exact"] for r in runs], marker="o", color=f"C{i}",
               label=f"{task}: validation")
        b.plot(ns, [r["train_exact"] for r in runs], marker="s", ls="--", color=f"C{i}",
               label=f"{task}: train")
        b.axhline(res["in_context"][task][str(max(ks))], color=f"C{i}", ls=":",
                  label=f"{task}: in-context k={max(ks)}")
        b.set_xticks(ns, [str(n) for n in ns])
        c = axes[2 + i]
        for j, (n, r) in enumerate(ft["runs"][task].items()):
            cv = r["curves"]
            c.plot(cv["train_step"], cv["train_loss"], color=f"C{j}", ls="--", alpha=0.7)
            c.plot(cv["val_step"], cv["val_loss"], color=f"C{j}", label=f"n={n}")
        c.set(xlabel="fine-tuning step", ylabel="answer loss (nats/token)", yscale="log",
              title=f"{task}: train (dashed) vs validation (solid)")
    b.set(xscale="log", xlabel="labelled examples (n)", ylabel="exact match",
          ylim=(-0.02, 1.02), title="fine-tuned (0 examples in the prompt)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
