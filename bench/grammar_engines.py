"""Grammar libraries on our vocabularies (llguidance vs xgrammar), and the engine's constrained-decoding overhead.

    python bench/grammar_engines.py                  # both parts (under 2 minutes on 2 cores)
    python bench/grammar_engines.py --skip-overhead  # only the library comparison
    python bench/grammar_engines.py --skip-libraries --steps 32   # only the overhead, longer

Part 1, for each library and each of our tokenizer kinds (GPT-2's 50k through tiktoken, a byte-level
BPE learned by gpt/data/bpe.py, a character vocabulary, a tokenizer.json through HFTokenizer):
whether it builds a tokenizer, the build time, the compile time of a JSON schema (OpenAI strict
style), and the mask time per token at batch 8 (8 matchers walking a valid instance in step, a
mask for each row then a token each, single-threaded). Not installed → "missing" (pip install
llguidance xgrammar). The engine uses llguidance (gpt/infer/constraints.py, docs/sampling.md).

Part 2: the 124M shape (GPT-2 small, random weights), 8 rows decoding together through our engine,
without and with a constraint on every row (a Lark grammar of JSON lines, each line a JSON object
of the schema, so rows never finish early): seconds per step and the overhead (target <= 10%).
The machine may be shared: compare numbers within one run, not across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpt.data.tokenizer import CharTokenizer, HFTokenizer, Tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags", "address"],
          "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                         "tags": {"type": "array", "items": {"type": "string", "enum": ["red", "green", "blue"]}},
                         "address": {"type": "object", "additionalProperties": False, "required": ["city", "zip"],
                                     "properties": {"city": {"type": "string"}, "zip": {"type": "string"}}}}}
INSTANCE = {"name": "Ada Lovelace of the Analytical Engine", "age": 36, "tags": ["red", "blue", "green", "red"],
            "address": {"city": "London and its many streets", "zip": "W1 1AA"}}
BATCH = 8


def shakespeare() -> str:
    for p in (ROOT / "data" / "shakespeare" / "input.txt", ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"):
        if p.is_file():
            return p.read_text(encoding="utf-8")
    sys.exit("Tiny Shakespeare not found: put it at data/shakespeare/input.txt")


def tokenizers(text: str) -> dict[str, Tokenizer]:
    """Our four kinds: GPT-2, a learned BPE, characters (printable ASCII, so JSON is possible), a tokenizer.json."""
    from tokenizers import Tokenizer as HF, decoders, models, pre_tokenizers, trainers

    from gpt.data.bpe import cached_gpt2, train_bpe

    out: dict[str, Tokenizer] = {}
    gpt2 = cached_gpt2()
    if gpt2 is not None:
        out["gpt2 (tiktoken)"] = gpt2
    out["bpe 4096 (ours)"] = train_bpe([text[:300_000]], 4096, log=lambda _: None)
    out["char (ascii)"] = CharTokenizer([chr(c) for c in range(32, 127)] + ["\n"])
    hf = HF(models.BPE())
    hf.pre_tokenizer, hf.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    hf.train_from_iterator([text[:300_000]], trainers.BpeTrainer(
        vocab_size=4096, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    out["tokenizer.json 4096"] = HFTokenizer(hf.to_str(), eos_ids=[0])
    return out


class Llguidance:
    name = "llguidance"

    def __init__(self):
        import llguidance  # noqa: F401

        from gpt.infer import constraints
        from gpt.infer.sampling import Constraint

        self.c, self.constraint = constraints, Constraint.json_schema(SCHEMA)

    def tokenizer(self, tok: Tokenizer):
        return self.c._build_tokenizer(tok)

    def compile(self, lltok, tok: Tokenizer):
        import llguidance as llg

        return llg.LLMatcher(lltok, self.c.grammar_text(self.constraint), log_level=0)

    def walk(self, lltok, compiled, ids: list[int]) -> float:
        import llguidance.numpy as llnp

        matchers = [compiled.deep_copy() for _ in range(BATCH)]
        bits = llnp.allocate_token_bitmask(BATCH, lltok.vocab_size)
        t = time.perf_counter()
        for token in ids:
            for i, m in enumerate(matchers):
                llnp.fill_next_token_bitmask(m, bits, i)
            for m in matchers:
                assert m.consume_token(token), m.get_error()[:200]
        return (time.perf_counter() - t) / len(ids)


class Xgrammar:
    name = "xgrammar"

    def __init__(self):
        import xgrammar  # noqa: F401

    def tokenizer(self, tok: Tokenizer):
        """Raw token bytes (xgrammar's VocabType.RAW); special tokens as empty strings (never text)."""
        import xgrammar as xgr

        special = set(tok.special_tokens.values()) | ({tok.eot_id} if tok.eot_id is not None else set())
        vocab = [b"" if i in special else tok.decode_bytes([i]) for i in range(tok.vocab_size)]
        stops = [tok.eot_id] if tok.eot_id is not None else [tok.vocab_size]
        info = xgr.TokenizerInfo(vocab + [b""] * (tok.eot_id is None), xgr.VocabType.RAW,
                                 vocab_size=tok.vocab_size + (tok.eot_id is None), stop_token_ids=stops)
        return xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)

    def compile(self, compiler, tok: Tokenizer):
        return compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False, separators=(",", ":"),
                                            strict_mode=True)

    def walk(self, compiler, compiled, ids: list[int]) -> float:
        import xgrammar as xgr

        matchers = [xgr.GrammarMatcher(compiled) for _ in range(BATCH)]
        bits = xgr.allocate_token_bitmask(BATCH, compiled.tokenizer_info.vocab_size)
        t = time.perf_counter()
        for token in ids:
            for i, m in enumerate(matchers):
                m.fill_next_token_bitmask(bits, i)
            for m in matchers:
                assert m.accept_token(token), f"xgrammar refused token {token}"
        return (time.perf_counter() - t) / len(ids)


def compare_libraries(text: str) -> None:
    toks = tokenizers(text)
    doc = json.dumps(INSTANCE, separators=(",", ":"))
    shakespeare_chars = CharTokenizer.from_text(text)
    print(f"JSON instance: {len(doc)} characters; batch {BATCH}; Tiny Shakespeare's own character vocabulary "
          f"({shakespeare_chars.vocab_size} chars) has {'{' in shakespeare_chars.stoi and 'a' or 'no'} '{{': "
          f"JSON cannot even start there (the engine refuses such a constraint in one line)")
    print(f"{'library':<11} {'tokenizer':<20} {'vocab':>6} {'build ms':>9} {'compile ms':>10} "
          f"{'tokens':>6} {'mask+advance us/token (8 rows)':>31}")
    for lib_cls in (Llguidance, Xgrammar):
        try:
            lib = lib_cls()
        except ImportError:
            print(f"{lib_cls.name:<11} missing (pip install {lib_cls.name})")
            continue
        for name, tok in toks.items():
            ids = tok.encode(doc)
            try:
                t = time.perf_counter()
                built = lib.tokenizer(tok)
                build = time.perf_counter() - t
                t = time.perf_counter()
                compiled = lib.compile(built, tok)
                compile_s = time.perf_counter() - t
                per_token = lib.walk(built, compiled, ids)
            except Exception as e:  # report and go on: that is the finding
                said = (str(e).splitlines() or [type(e).__name__])[0][:80]
                print(f"{lib.name:<11} {name:<20} {tok.vocab_size:>6} FAILED: {said}")
                continue
            print(f"{lib.name:<11} {name:<20} {tok.vocab_size:>6} {build * 1e3:>9.1f} {compile_s * 1e3:>10.1f} "
                  f"{len(ids):>6} {per_token * 1e6:>31.0f}")


def measure_overhead(steps: int) -> None:
    """Seconds per engine step at batch 8 on the 124M shape, without and with a constraint on every row."""
    import torch

    from gpt.config import ModelConfig
    from gpt.data.bpe import cached_gpt2
    from gpt.infer.engine import Engine
    from gpt.infer.sampling import Constraint, SamplingParams
    from gpt.model import GPT

    tok = cached_gpt2()
    if tok is None:
        print("overhead: skipped (GPT-2's tokenizer is not cached; set TIKTOKEN_CACHE_DIR)")
        return
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304)).eval()
    lines = Constraint.grammar(f"start: line+\nline: %json {json.dumps(SCHEMA)} \"\\n\"")
    prompt = tok.encode("Here is a person as JSON:\n")
    results = {}
    for label, constraint in (("free", None), ("constrained", lines), ("free again", None)):
        engine = Engine(model, tok, max_batch=BATCH)
        for b in range(BATCH):
            engine.add(prompt, SamplingParams(max_tokens=steps + 2, seed=b, top_k=200, constraint=constraint))
        engine.step()  # prefill and the first token: not timed
        times = []
        while engine.busy and len(engine.active) == BATCH:
            t = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - t)
        results[label] = statistics.median(times)
        print(f"overhead: {label:<12} {results[label] * 1e3:8.1f} ms/step (median of {len(times)} steps, {BATCH} rows)")
        if constraint is not None and engine.active:  # the masks alone, less exposed to a busy machine
            t = time.perf_counter()
            for _ in range(20):
                engine._masks()
            print(f"overhead: the {len(engine.active)} rows' masks alone {(time.perf_counter() - t) / 20 * 1e3:.2f} ms/step")
    base = (results["free"] + results["free again"]) / 2
    print(f"overhead: constrained / free = {results['constrained'] / base:.3f} "
          f"({(results['constrained'] / base - 1) * 100:+.1f}%; target <= +10%); threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.1f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12, help="timed decode steps per variant in the overhead part")
    p.add_argument("--skip-overhead", action="store_true")
    p.add_argument("--skip-libraries", action="store_true")
    args = p.parse_args()
    if not args.skip_libraries:
        compare_libraries(shakespeare())
    if not args.skip_overhead:
        measure_overhead(args.steps)


if __name__ == "__main__":
    main()
