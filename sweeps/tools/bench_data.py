"""Data benchmark: `python -m sweeps.bench_data [mb=500] [small_mb=20] [vocab_size=8192] [steps=50]`.

Generates two deterministic corpora (jsonl files of synthetic documents: prose over a Zipfian
vocabulary of made-up words, a quarter of the documents code-like lines), then prints

  - prepare throughput (MB of text per second, load average next to it) on the large corpus for
    the byte tokenizer and for a BPE trained on it (tokenizer training and encoding separately,
    encoding also per CPU-second, which a shared machine's load moves less), and the tokenizers
    library's own encode_batch on 8 MB of the same text for reference;
  - start-up and peak resident memory of a `steps`-step training run from byte shards of the
    small and of the large corpus (start-up: process start to the first training step, and the
    data's share of it: opening the dataset, the held-out windows and the first batch), and the
    same for data=text on the same text for contrast (compare_text=true).

Timings on a shared machine move with its load: each line carries the 1-minute load average.
The working directory (generated text and shards, about 4x `mb`) is deleted at the end unless
keep=true.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer as HFTokenizer

from sweeps.config import BenchDataConfig, PrepareConfig, TokenizerConfig, TokenizerName
from sweeps.engine.shards import MANIFEST
from sweeps.tools.prepare import prepare

ROOT = Path(__file__).resolve().parents[2]


# --- the synthetic corpus --------------------------------------------------------------------------------

_SYLLABLES = ("a e i o u y ka to ri an en in on st th er re la mo ne se ch ou ar al is es or ti de co pr wh be sh "
              "gu pl ion ent ing").split()


class TextGenerator:
    """Deterministic text with natural-language-like repetition: word ranks Zipf(1.25) over 300k
    made-up words (frequent words short), commas, sentence ends, capitals, numbers, paragraphs;
    about 4% of 35 MB's pre-tokenizer pieces are distinct, like English prose of that size."""

    K = 300_000

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        n_syl = 1 + (np.log2(np.arange(self.K) + 2) / 2.2).astype(int) + self.rng.integers(0, 2, self.K)
        syl = self.rng.integers(0, len(_SYLLABLES), (self.K, int(n_syl.max())))
        words = ["".join(_SYLLABLES[j] for j in syl[i, :n]) for i, n in enumerate(n_syl.tolist())]
        # variant v of word k (capitalised or not): plain, comma, period, a number, paragraph end
        table = []
        for cap in (False, True):
            ws = [w.capitalize() for w in words] if cap else words
            table += ws + [w + "," for w in ws] + [w + "." for w in ws] + [str(k % 1000) for k in range(self.K)] \
                + [w + ".\n" for w in ws]
        self.table = table
        self.words = words

    def prose(self, n: int) -> str:
        r = self.rng
        k = (r.zipf(1.25, n) - 1) % self.K
        v = r.choice(5, n, p=[0.84, 0.07, 0.055, 0.01, 0.025])
        cap = np.concatenate([[True], np.isin(v[:-1], (2, 4))])
        idx = (cap * 5 + v) * self.K + k
        return " ".join(map(self.table.__getitem__, idx.tolist())).replace("\n ", "\n") + "\n"

    def code(self, n_lines: int) -> str:
        r = self.rng
        lines = []
        for depth, kind, m in zip(r.integers(0, 4, n_lines).tolist(), r.integers(0, 5, n_lines).tolist(),
                                  r.integers(1, 5, n_lines).tolist()):
            names = [self.words[(k - 1) % 20_000] for k in r.zipf(1.3, m + 1).tolist()]
            pad = "    " * depth
            if kind == 0:
                lines.append(f"{pad}def {names[0]}_{names[-1]}({', '.join(names[1:])}):")
            elif kind == 1:
                lines.append(f"{pad}{names[0]} = {names[-1]}({m}, {'_'.join(names[1:])})")
            elif kind == 2:
                lines.append(f"{pad}return {' + '.join(names)}")
            elif kind == 3:
                lines.append(f"{pad}if {names[0]} is not None and {names[-1]} > {m * 7}:")
            else:
                lines.append(f"{pad}# {' '.join(names)}")
        return "\n".join(lines) + "\n"

    def document(self) -> str:
        r = self.rng
        if r.random() < 0.25:
            return self.code(int(r.integers(20, 300)))
        return self.prose(int(np.exp(r.uniform(np.log(200), np.log(4000)))))


def write_corpus(directory: Path, mb: int, seed: int, file_mb: int = 64) -> dict:
    """`mb` MB of text as jsonl files of {"text": ...} documents."""
    directory.mkdir(parents=True, exist_ok=True)
    gen = TextGenerator(seed)
    target, written, docs, files = mb * 10**6, 0, 0, 0
    f = None
    while written < target:
        if f is None or f.tell() >= file_mb * 10**6:
            if f is not None:
                f.close()
            f = open(directory / f"part-{files:04d}.jsonl", "w")
            files += 1
        doc = gen.document()
        f.write(json.dumps({"id": docs, "text": doc}) + "\n")
        written += len(doc.encode())
        docs += 1
    f.close()
    return {"text_bytes": written, "documents": docs, "files": files}


# --- measurements ------------------------------------------------------------------------------------------


def load() -> str:
    return f"load {os.getloadavg()[0]:.1f}/{len(os.sched_getaffinity(0))} cores"


def say(msg: str) -> None:
    print(msg, flush=True)


_RUN = textwrap.dedent("""
    import json, resource, sys, time
    t_start = time.perf_counter()
    overrides = json.loads(sys.argv[1])
    from hydra import compose, initialize_config_dir
    from sweeps.config import CONF, register_configs, to_typed
    import sweeps.engine.loop as loop
    from sweeps.engine.trainer import Trainer
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = to_typed(compose(config_name="config", overrides=overrides))
    times = {}
    open_dataset = loop.open_dataset

    class Timed:
        def __init__(self, ds):
            self.ds = ds
        def __getattr__(self, name):
            return getattr(self.ds, name)
        def eval_windows(self, *a):
            t = time.perf_counter()
            out = self.ds.eval_windows(*a)
            times["eval_windows_s"] = time.perf_counter() - t
            times["rss_data_mb"] = rss_mb() - times["rss_before_data_mb"]  # opening and held-out windows
            return out
        def train_batch(self, *a, **k):
            t, before = time.perf_counter(), rss_mb()
            out = self.ds.train_batch(*a, **k)
            if "first_batch_s" not in times:
                times["first_batch_s"] = time.perf_counter() - t
                times["rss_data_mb"] += rss_mb() - before  # and the first batch
            return out

    def rss_mb():
        return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize() / 2**20

    def timed_open(data):
        times["rss_before_data_mb"] = rss_mb()
        t = time.perf_counter()
        ds = open_dataset(data)
        times["open_s"] = time.perf_counter() - t
        return Timed(ds)

    step = Trainer.step

    def timed_step(self, *a, **k):
        times.setdefault("to_first_step_s", time.perf_counter() - t_start)
        return step(self, *a, **k)

    loop.open_dataset = timed_open
    Trainer.step = timed_step
    row = loop.train(cfg)
    times["wall_s"] = time.perf_counter() - t_start
    times["data_s"] = times["open_s"] + times["eval_windows_s"] + times["first_batch_s"]
    times["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times["end_rss_mb"] = rss_mb()
    times["status"] = row["status"]
    times["epochs"] = row["epochs"]
    print("RESULT " + json.dumps(times))
""")


def train_run(data: list[str], root: Path, cfg: BenchDataConfig, steps: int) -> dict:
    b, t = 16, 128
    overrides = [f"+arch={cfg.arch}", "sweep=none", f"arch.size={cfg.size}", f"train.seq_len={t}",
                 f"train.batch_size={b}", f"train.tokens={steps * b * t}", "train.eval_windows=32", "train.eval_batch=16",
                 "train.evals=1", "train.progress=false", "train.tensorboard=false", "train.checkpoint_every_s=3600",
                 f"root={root}", *data]
    proc = subprocess.run([sys.executable, "-c", _RUN, json.dumps(overrides)], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ))
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        raise RuntimeError(f"training run failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(line[len("RESULT "):])


def _library_baseline(text_dir: Path, tokenizer_json: Path, mb: float = 8.0) -> dict:
    """Hugging Face `encode_batch` on the first `mb` MB of documents (the reference prepare beats)."""
    hf = HFTokenizer.from_file(str(tokenizer_json))
    docs, n = [], 0
    with open(sorted(text_dir.glob("*.jsonl"))[0]) as f:
        for line in f:
            docs.append(json.loads(line)["text"])
            n += len(docs[-1].encode())
            if n >= mb * 1e6:
                break
    t = time.perf_counter()
    hf.encode_batch(docs, add_special_tokens=False)
    return {"mb": n / 1e6, "mb_per_s": n / 1e6 / (time.perf_counter() - t)}


def _prepare(inp: Path, out: Path, tok: TokenizerConfig, workers: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    return prepare(PrepareConfig(input=[str(inp)], out=str(out), tokenizer=tok, workers=workers, progress=False))


def main(cfg: BenchDataConfig) -> dict:
    work = Path(cfg.dir) if cfg.dir else Path(tempfile.mkdtemp(prefix="bench_data_", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    out: dict = {"machine": load()}
    try:
        corpora = {}
        for name, mb in (("small", cfg.small_mb), ("large", cfg.mb)):
            t0 = time.perf_counter()
            corpora[name] = write_corpus(work / f"{name}-text", mb, cfg.seed + (name == "large"))
            say(f"generated {name} corpus: {corpora[name]['text_bytes'] / 1e6:.0f} MB, {corpora[name]['documents']:,} "
                f"documents in {time.perf_counter() - t0:.0f}s ({load()})")

        workers = cfg.workers or len(os.sched_getaffinity(0))
        results = {}
        for name in ("small", "large"):
            r = _prepare(work / f"{name}-text", work / f"{name}-byte", TokenizerConfig(), workers)
            results[f"byte-{name}"] = r
            say(f"prepare byte, {name}: {r['text_bytes'] / 1e6:.0f} MB in {r['seconds']:.1f}s = "
                f"{r['text_bytes'] / 1e6 / r['seconds']:.1f} MB/s ({load()})")
        bpe = TokenizerConfig(name=TokenizerName.bpe, vocab_size=cfg.vocab_size, train_bytes=cfg.train_bytes)
        r = _prepare(work / "large-text", work / "large-bpe", bpe, workers)
        results["bpe-large"] = r
        m = r["manifest"]
        tokens = m["splits"]["train"]["tokens"] + m["splits"]["heldout"]["tokens"]
        say(f"prepare bpe {m['tokenizer']['vocab_size']}, large, {workers} workers: {r['text_bytes'] / 1e6:.0f} MB in "
            f"{r['seconds']:.1f}s = {r['text_bytes'] / 1e6 / r['seconds']:.1f} MB/s end to end; tokenizer "
            f"{r['tokenizer_s']:.1f}s (sample {m['tokenizer']['settings']['sample_bytes'] / 1e6:.0f} MB), encoding "
            f"{r['text_bytes'] / 1e6 / r['encode_s']:.1f} MB/s ({r['text_bytes'] / 1e6 / r['encode_cpu_s']:.1f} MB per "
            f"CPU-second of the encoders); {r['text_bytes'] / tokens:.2f} bytes/token ({load()})")
        lib = _library_baseline(work / "large-text", work / "large-bpe" / "tokenizer.json")
        say(f"the tokenizers library itself (Tokenizer.encode_batch, its own threads) on {lib['mb']:.0f} MB of the "
            f"same text: {lib['mb_per_s']:.1f} MB/s ({load()})")
        out["library_encode_batch_mb_per_s"] = lib["mb_per_s"]
        out["prepare"] = {k: {"mb_per_s": v["text_bytes"] / 1e6 / v["seconds"],
                              "encode_mb_per_s": v["text_bytes"] / 1e6 / v["encode_s"],
                              "encode_mb_per_cpu_s": v["text_bytes"] / 1e6 / max(1e-9, v["encode_cpu_s"]),
                              "seconds": v["seconds"],
                              "tokenizer_s": v.get("tokenizer_s", 0.0), "text_mb": v["text_bytes"] / 1e6}
                          for k, v in results.items()}

        runs = work / "runs"
        say(f"warm-up run (compiles once for the measured runs) ({load()})")
        train_run(["data=tokens", f"data.dir={work / 'small-byte'}"], runs / "warm", cfg, 2)
        out["runs"] = {}
        variants = [("tokens", lambda n: ["data=tokens", f"data.dir={work / f'{n}-byte'}"])]
        if cfg.compare_text:
            variants.append(("text", lambda n: ["data=text", f"data.paths=[{work / f'{n}-text'}]"]))
        for source, data in variants:
            for name in ("small", "large"):
                r = train_run(data(name), runs / f"{source}-{name}", cfg, cfg.steps)
                out["runs"][f"{source}-{name}"] = r
                mb = corpora[name]["text_bytes"] / 1e6
                say(f"{cfg.steps}-step run, data={source}, {name} ({mb:.0f} MB): first step after "
                    f"{r['to_first_step_s']:.1f}s, data {r['data_s']:.2f}s (open {r['open_s']:.2f}s, windows "
                    f"{r['eval_windows_s']:.2f}s, first batch {r['first_batch_s'] * 1e3:.1f}ms), wall {r['wall_s']:.1f}s, "
                    f"peak RSS {r['peak_rss_mb']:.0f} MB (the data's share {r['rss_data_mb']:+.0f} MB; at the end "
                    f"{r['end_rss_mb']:.0f} MB) ({load()})")
            s, lg = out["runs"][f"{source}-small"], out["runs"][f"{source}-large"]
            say(f"data={source}: large/small start-up {lg['to_first_step_s'] / s['to_first_step_s']:.2f}x (data part "
                f"{lg['data_s']:.2f}s vs {s['data_s']:.2f}s), peak RSS {lg['peak_rss_mb'] - s['peak_rss_mb']:+.0f} MB "
                f"(the data's share {lg['rss_data_mb'] - s['rss_data_mb']:+.0f} MB)")
        say("summary " + json.dumps(out))
        return out
    finally:
        if not cfg.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            say(f"kept {work} ({MANIFEST}s under *-byte, *-bpe)")
