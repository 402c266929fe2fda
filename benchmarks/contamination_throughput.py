"""Speed of `medtune data contamination` on a generated training set, one JSON line per measurement.

    python benchmarks/contamination_throughput.py [--records 1000000] [--ngram 13]

Generates (deterministically, from a seed) `--records` synthetic medical-style training records in the three
formats medtune trains on -- half pretraining text lines (.txt), 30% ShareGPT conversations, 20% preference pairs
(.jsonl) -- with 20 bundled CMB items planted verbatim at even intervals, then streams them against the bundled
CMB-Exam and CMB-Clin items. Each path is timed over the same files, from reading the files to the overlap
fractions (file reading, JSON parsing, validation, normalisation, n-gram lookup):
- `read_only`: reading, validating and normalising the records, no n-grams (the floor);
- `numpy_batch` (what medtune runs): polynomial hashes of every window of a batch of 256 records in a few numpy
  array operations, a bitmap and a sorted array for the lookup;
- `builtin_hash`: Python's own str hash over n-character slices of each record, one C-level set scan per record;
- `rolling_hash`: a polynomial rolling hash over code points in Python, per record (the textbook alternative).
Every path must find exactly the planted records. The last line gives records/s of the shipped path (wall and CPU
seconds: on a shared machine wall time includes waiting for a core) and the ratios between the paths.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from medtune.data.contamination import EvalIndex, build_eval_index, normalise, scan_training

REPO = Path(__file__).resolve().parents[1]

EVAL = [str(REPO / "data" / "eval" / "cmb")]
PLANTED = 20
SUBJECTS = ["患者", "老年女性", "青年男性", "孕妇", "患儿", "糖尿病患者", "高血压患者", "慢性肾病患者"]
FINDINGS = ["反复咳嗽咳痰两周", "活动后胸闷气短", "上腹部隐痛伴反酸", "发热伴寒战三天", "双下肢水肿", "头晕乏力",
            "尿频尿急尿痛", "夜间阵发性呼吸困难", "血压控制不佳", "空腹血糖升高", "皮肤黄染", "关节红肿疼痛"]
ADVICE = ["建议完善血常规和C反应蛋白检查", "应监测血压并调整降压方案", "需排除急性冠脉综合征", "注意低盐低脂饮食",
          "遵医嘱规律服药并定期复诊", "必要时行胸部CT检查", "避免自行加用非甾体抗炎药", "用药前应评估肝肾功能",
          "孕期用药须权衡利弊", "出现症状加重应及时就医"]


def sentence(rng: random.Random) -> str:
    return (f"{rng.choice(SUBJECTS)}{rng.randint(18, 90)}岁，{rng.choice(FINDINGS)}，{rng.choice(FINDINGS)}，"
            f"{rng.choice(ADVICE)}；{rng.choice(ADVICE)}。")


def planted_texts() -> list[str]:
    items = json.loads((REPO / "data" / "eval" / "cmb" / "val.json").read_text(encoding="utf-8"))
    return [item["question"] + " " + " ".join(f"{k}. {v}" for k, v in item["option"].items()) for item in items]


def generate(folder: Path, records: int, seed: int = 0) -> int:
    """Write the training set; returns how many eval items were planted."""
    rng, plants, planted = random.Random(seed), planted_texts(), 0
    every = max(1, records // PLANTED)
    with (open(folder / "pretrain.txt", "w", encoding="utf-8") as text,
          open(folder / "conversations.jsonl", "w", encoding="utf-8") as chats,
          open(folder / "preference.jsonl", "w", encoding="utf-8") as pairs):
        for number in range(records):
            body = sentence(rng) + sentence(rng)
            if number % every == every - 1 and planted < PLANTED:
                body, planted = plants[planted % len(plants)], planted + 1
            kind = number % 10
            if kind < 5:
                text.write(body + "\n")
            elif kind < 8:
                chats.write(json.dumps({"conversations": [{"from": "human", "value": body},
                                                          {"from": "gpt", "value": sentence(rng)}]},
                                       ensure_ascii=False) + "\n")
            else:
                pairs.write(json.dumps({"system": "", "history": [], "question": body,
                                        "response_chosen": sentence(rng), "response_rejected": sentence(rng)},
                                       ensure_ascii=False) + "\n")
    return planted


class ReadOnlyIndex(EvalIndex):
    def batch_overlaps(self, texts: list[str]) -> list[dict[int, float]]:
        return [{} for _ in texts]


class PerRecordIndex(EvalIndex):
    """The same items keyed by a hash that Python computes record by record (the comparison paths)."""

    def __init__(self, source: EvalIndex, texts: list[str], hashes_of):
        super().__init__(source.n)
        self.items, self.too_short, self.hashes_of = source.items, source.too_short, hashes_of
        for index, text in enumerate(texts):
            self.own(index, set(hashes_of(normalise(text))))

    def batch_overlaps(self, texts: list[str]) -> list[dict[int, float]]:
        keys = self.owners.keys()
        return [{} if keys.isdisjoint(self.hashes_of(text)) else self.shares(self.hashes_of(text)) for text in texts]


def builtin_hashes(n: int):
    """Python's own str hash of each n-character slice, fed lazily to one C-level set scan."""
    return lambda text: map(hash, [text[i:i + n] for i in range(len(text) - n + 1)])


def rolling_hashes(n: int, base: int = 1_000_003, mask: int = (1 << 64) - 1):
    """A polynomial rolling hash (mod 2**64) over code points, in Python."""
    drop = pow(base, n, 1 << 64)

    def hashes_of(text: str) -> list[int]:
        hashes, h, codes = [], 0, [ord(c) for c in text]
        for i, code in enumerate(codes):
            h = (h * base + code) & mask
            if i >= n:
                h = (h - codes[i - n] * drop) & mask
            if i >= n - 1:
                hashes.append(h)
        return hashes

    return hashes_of


def eval_texts() -> list[str]:
    """The eval items' texts in index order, for re-keying the rolling-hash index."""
    from medtune.data.contamination import DATA_SUFFIXES, eval_item_text, iter_records
    from medtune.data.readers import data_files
    from medtune.data.records import ClinCase, ExamItem

    texts = []
    for path in data_files(EVAL, DATA_SUFFIXES):
        texts += [eval_item_text(e.record) for e in iter_records(path, [])
                  if isinstance(e.record, (ExamItem, ClinCase))]
    return texts


def timed(name: str, index: EvalIndex, folder: Path, planted: int, threshold: float) -> dict:
    started, cpu_started = time.perf_counter(), time.process_time()
    scan = scan_training(index, [str(folder)], threshold)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    # On a shared machine wall time includes waiting for a core; CPU seconds are this process's own work.
    row = {"path": name, "records": scan.records, "seconds": round(seconds, 2), "cpu_seconds": round(cpu_seconds, 2),
           "records_per_s": round(scan.records / seconds), "records_per_cpu_s": round(scan.records / cpu_seconds),
           "matches": len(scan.matches)}
    if name != "read_only":
        assert len({(m.train_file, m.line) for m in scan.matches}) == planted, "planted items not all found"
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--ngram", type=int, default=13)
    parser.add_argument("--threshold", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="contamination-bench-") as scratch:
        folder = Path(scratch)
        started = time.perf_counter()
        planted = generate(folder, args.records, args.seed)
        size = sum(p.stat().st_size for p in folder.iterdir())
        print(json.dumps({"generated_records": args.records, "planted": planted, "megabytes": round(size / 2**20, 1),
                          "seconds": round(time.perf_counter() - started, 1)}), flush=True)
        index, _ = build_eval_index(EVAL, args.ngram)
        texts = eval_texts()
        paths = {"read_only": ReadOnlyIndex(args.ngram), "numpy_batch": index,
                 "builtin_hash": PerRecordIndex(index, texts, builtin_hashes(args.ngram)),
                 "rolling_hash": PerRecordIndex(index, texts, rolling_hashes(args.ngram))}
        rows = {name: timed(name, idx, folder, planted, args.threshold) for name, idx in paths.items()}
    shipped, cpu = rows["numpy_batch"], "records_per_cpu_s"
    print(json.dumps({"records_per_s": shipped["records_per_s"], "records_per_cpu_s": shipped[cpu],
                      "eval_items": len(index.items), "eval_ngrams": len(index.owners),
                      "numpy_vs_builtin_hash_cpu": round(shipped[cpu] / rows["builtin_hash"][cpu], 2),
                      "builtin_vs_rolling_hash_cpu": round(rows["builtin_hash"][cpu] / rows["rolling_hash"][cpu], 2),
                      "share_of_read_only_speed_cpu": round(shipped[cpu] / rows["read_only"][cpu], 2)}))


if __name__ == "__main__":
    main()
