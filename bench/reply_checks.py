"""reply_checks.json: CPU cost of the reply checks (pipeline/checks.py) per reply, by reply size (issue 9).

- Replies: varied prose (random words; nothing repeats, so the repetition rule scans every period
  up to `checks.repetition_max_period`, its worst case), the same prose as one long loop, and a
  markdown table of 40 rows (the `table` task's parse and validity check included).
- Sizes: 1,000, 4,000 and 16,000 characters (about 250 to 4,000 tokens of output).
- Figures: milliseconds per `check_reply` call (median of `--repeats`), and per 1,000 characters.
  For scale: generating 4,000 tokens takes seconds on a GPU, so checks of a few ms are noise.

No wall-clock assertions; no Ray.

    .venv/bin/python -m bench.reply_checks [--repeats 20]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from bench import machine, write_result

NAME = "reply_checks"


def _prose(n: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    words = []
    while sum(len(w) + 1 for w in words) < n:
        words.append("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 10))))
    return " ".join(words)[:n]


def _table(rows: int) -> str:
    return "| Item | Qty | Price |\n|---|---|---|\n" + "\n".join(f"| item {i} | {i % 7} | {i * 1.25:.2f} |"
                                                              for i in range(rows))


def main() -> None:
    from pipeline.checks import check_reply
    from pipeline.config import ChecksConfig
    from pipeline.engines.base import Reply

    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    cfg = ChecksConfig()
    figures = []
    cases = [(f"prose_{n}", "ocr", _prose(n)) for n in (1000, 4000, 16000)]
    cases += [(f"loop_{n}", "ocr", (_prose(60) + " ") * (n // 61)) for n in (1000, 16000)]
    cases += [("table_40_rows", "table", _table(40))]
    for name, task, text in cases:
        reply = Reply(text=text, finish_reason="stop", completion_tokens=len(text) // 4)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            verdict = check_reply(reply, task, cfg)
            times.append((time.perf_counter() - t0) * 1000.0)
        ms = statistics.median(times)
        row = {"case": name, "chars": len(text), "ms": round(ms, 3), "ms_per_1k_chars": round(ms * 1000 / len(text), 3),
               "verdict": verdict.reason or "ok"}
        figures.append(row)
        print(f"{name:<16} {len(text):>6} chars  {ms:7.2f} ms  ({row['ms_per_1k_chars']:.2f} ms / 1k chars)  "
              f"{row['verdict']}")
    path = write_result(NAME, {"machine": machine(), "repeats": args.repeats, "figures": figures})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
