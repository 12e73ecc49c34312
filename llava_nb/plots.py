"""Pictures of a run with matplotlib: the library computes, notebooks show what these return."""

from __future__ import annotations

import io
from collections.abc import Sequence

from matplotlib.figure import Figure


class NotebookFigure(Figure):
    """A Figure that shows itself as a PNG wherever IPython displays it (Colab, JupyterLab, VS Code).

    Made without pyplot, so scripts and tests need no display; but then no backend registers a
    formatter for it, and a stock kernel would print `<Figure size ... with N Axes>`. `_repr_png_` is
    what IPython asks any object for, so no `%matplotlib inline` is needed.
    """

    def _repr_png_(self) -> bytes:
        buffer = io.BytesIO()
        self.savefig(buffer, format="png", bbox_inches="tight")
        return buffer.getvalue()


def loss_curve(log_history: Sequence[dict], *, title: str = "") -> NotebookFigure:
    """Train and eval loss against the optimizer step, from `Trainer.state.log_history`.

    A NotebookFigure: a notebook shows it as a picture when it is a cell's last expression (or through
    `IPython.display.display`), and scripts save it with `savefig`.
    """
    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    evals = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e and "step" in e]
    if not train and not evals:
        raise ValueError(
            "the log history holds no 'loss' or 'eval_loss' entry: was anything logged? "
            "(logging_steps / eval_steps larger than max_steps?)"
        )
    fig = NotebookFigure(figsize=(7, 4), layout="constrained")
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train), marker=".", label="train loss")
    if evals:
        ax.plot(*zip(*evals), marker="o", label="eval loss (held out)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy on the replies")
    ax.set_title(title or "loss")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def answer_grid(
    answers: dict[str, Sequence[dict]], *, n: int = 8, ncols: int = 4, width: float = 3.2
) -> NotebookFigure:
    """Images with their question, the expected reply and each model's answer (✓/✗ where scored).

    `answers` maps a label ('before', 'after') to `scoring.Evaluation.answers` of the same samples.
    First questions come first, so the grid shows `n` different images where there are as many.
    """
    labels = list(answers)
    first = answers[labels[0]]
    order = sorted(range(len(first)), key=lambda i: first[i]["turn"])[
        :n
    ]  # stable: sample order within a turn
    nrows = max(1, -(-len(order) // ncols))
    fig = NotebookFigure(figsize=(width * ncols, (width + 1.1) * nrows), layout="constrained")
    for k, i in enumerate(order):
        ax = fig.add_subplot(nrows, ncols, k + 1)
        ax.axis("off")
        shown = first[i]
        if shown["image"] is not None:
            ax.imshow(shown["image"])
        lines = [_short(shown["question"], 40), f"expected: {_short(shown['expected'])}"]
        lines += [
            f"{label}: {_short(answers[label][i]['predicted'] or '(nothing)')}{_mark(answers[label][i])}"
            for label in labels
        ]
        ax.set_title("\n".join(lines), fontsize=8, loc="left")
    return fig


def _short(text: str, width: int = 30) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _mark(answer: dict) -> str:
    return "" if answer.get("correct") is None else (" ✓" if answer["correct"] else " ✗")


def benchmark_chart(
    scores: dict[str, dict],
    references: dict[str, float] | None = None,
    *,
    chance: float | None = 50.0,
    title: str = "",
) -> NotebookFigure:
    """Bars of a benchmark's score before and after training beside published ones, in %.

    `scores` maps a label ('before', 'after') to an evaluation's metrics: accuracy, and F1 where it has
    one (POPE); `references` maps a published model to its score (as its paper reports it).
    `chance` draws a dashed line (POPE: 50 %, a coin toss or always "yes").
    """
    fig = NotebookFigure(figsize=(7, 3.6), layout="constrained")
    ax = fig.add_subplot()
    labels, heights, colours = [], [], []
    for label, m in scores.items():
        for metric, colour in (("accuracy", "tab:blue"), ("f1", "tab:cyan")):
            if m.get(metric) is not None:
                labels.append(f"{label}\n{'F1' if metric == 'f1' else metric}")
                heights.append(100 * m[metric])
                colours.append(colour)
    for name, value in (references or {}).items():
        labels.append(name.replace(" ", "\n", 1) + "\n(published)")
        heights.append(value)
        colours.append("tab:gray")
    bars = ax.bar(range(len(heights)), heights, color=colours)
    ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks(range(len(heights)), labels, fontsize=8)
    if chance is not None:
        ax.axhline(chance, color="tab:red", linestyle="--", linewidth=1, label=f"chance ({chance:.0f} %)")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_ylim(0, 100)
    ax.set_ylabel("%")
    ax.set_title(title or "score before and after training")
    ax.grid(axis="y", alpha=0.3)
    return fig
