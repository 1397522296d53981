"""Beam-decode a test set with a LoRA adapter: the original gpt2_beam.py + gpt2_decode.py in one stage.

    python -m steps.decode --data data/encoded/test.jsonl --input_file data/formatted/test.jsonl \\
        --adapter models/finetune --init_checkpoint data/base/standin.safetensors \\
        --beam 10 --length_penalty 0.8 --no_repeat_ngram_size 4 --eos_token_id 628 --eval_len 64 --work_dir outputs

Differences from the original, none of which changes a prediction (docs/fidelity.md, "Decoding"):
  - the base checkpoint AND the adapter are loaded (the original loaded one file, so a LoRA-only checkpoint ran
    on a random base); model card, r and alpha come from adapter_config.json instead of being retyped, and an
    adapter trained on another base (sha256) is refused unless --ignore_base_mismatch;
  - LoRA is merged into the weights, so inference costs the same as the plain model;
  - one search per unique query (the E2E test set has 630 MRs for 4,693 lines), sorted by length and decoded
    --batch_size at a time, each query reading its own rows, with a KV cache and a provably safe early stop;
  - predictions are written in input order to predictions.jsonl (the original wrote them in a shuffled order);
    the original's {"id", "predict"} file only with an explicit --output_file.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from steps.core.common import DEFAULT_SEQ_LEN, InputError, atomic_write, iter_jsonl, require_writable, run_stage, sha256_file
from steps.core.runtime import PRECISIONS
from steps.datasets.readers import DATASETS
from steps.decoding.beam import BeamConfig, Hypothesis, beam_search
from steps.decoding.scorer_files import EXAMPLES_FILE, clean_text, write_scorer_files
from steps.formats.checkpoints import (
    apply_adapter,
    load_adapter,
    load_base_weights,
    lora_config_of,
    model_config_of,
    read_tensors,
)
from steps.model.gpt2 import GPT2, card
from steps.model.tokenizer import EOS_ID, get_tokenizer

# Unique queries searched together: the original gpt2_beam.py's --batch_size. Not a BeamConfig field, because it
# changes only how many searches share a forward pass (speed and memory), never a result: a batched search returns
# what one query at a time does (tests/test_beam.py checks that). BeamConfig holds what defines the outputs.
DEFAULT_BATCH_SIZE = 10

# ----------------------------------------------------------------------------------------------- model loading


def load_for_inference(
    adapter: str | os.PathLike | None,
    init_checkpoint: str | os.PathLike | None,
    device: str | torch.device = "cpu",
    model_card: str | None = None,
    lora_dim: int = 0,
    lora_alpha: float | None = None,
    ignore_base_mismatch: bool = False,
) -> GPT2:
    """Base weights + adapter, LoRA merged, in eval mode on `device`.

    `adapter`: our adapter directory (or its adapter.safetensors), or an original-trainer `model.<step>.pt`
    (LoRA-only or full; those record no alpha, so `lora_alpha` must be given). Without `adapter`, a full original
    checkpoint given as `init_checkpoint` still brings its LoRA tensors, as the original loaded them. Without
    `init_checkpoint`, the base recorded in the adapter config is used if that file exists; a random base is
    never used silently. `model_card`/`lora_dim`/`lora_alpha`, when given, must agree with the adapter.
    """
    if adapter is None and init_checkpoint is not None and _has_lora_tensors(init_checkpoint):
        adapter = init_checkpoint  # an original end-of-epoch checkpoint: base and LoRA in one file
    config = None
    if adapter is not None:
        tensors, config = load_adapter(adapter, lora_alpha=lora_alpha)
        _check_agrees(config, model_card, lora_dim, lora_alpha, adapter)
        init_checkpoint = init_checkpoint or _recorded_base(config)
    if init_checkpoint is None:
        raise InputError("no base weights: pass --init_checkpoint (the GPT-2 model.safetensors / pytorch_model.bin the "
                         "adapter was trained on); decoding with a random base gives garbage")
    if config is not None and config["base"].get("sha256"):
        actual = sha256_file(init_checkpoint)
        if actual != config["base"]["sha256"]:
            message = (f"the adapter was trained on base sha256 {config['base']['sha256'][:12]}... "
                       f"({config['base'].get('path')}) but {init_checkpoint} has sha256 {actual[:12]}...")
            if not ignore_base_mismatch:
                raise InputError(message + "; pass the right --init_checkpoint, or --ignore_base_mismatch if you know "
                                 "the weights are the same", adapter)
            print(f"warning: {message}; continuing (--ignore_base_mismatch)", file=sys.stderr)
    cfg = model_config_of(config) if config is not None else card(model_card or "gpt2.sm")
    model = GPT2(cfg, lora=lora_config_of(config) if config is not None else None)
    load_base_weights(model, init_checkpoint)
    if config is not None:
        apply_adapter(model, tensors, adapter)
        model.merge_lora()
    return model.eval().to(device)


def _has_lora_tensors(path: str | os.PathLike) -> bool:
    """Whether a base checkpoint also carries LoRA tensors, without reading its weights when possible."""
    path = Path(path)
    with contextlib.suppress(Exception):
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt", device="cpu") as f:
                return any(".lora_" in k for k in f.keys())  # noqa: SIM118 (safe_open is not a dict)
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # memory-mapped: keys only
        state = state.get("model_state_dict", state) if isinstance(state, dict) else state
        return isinstance(state, dict) and any(".lora_" in k for k in state)
    return any(".lora_" in k for k in read_tensors(path))  # unusual files: let read_tensors explain what is wrong


def _check_agrees(config: dict, model_card: str | None, lora_dim: int, lora_alpha: float | None, source) -> None:
    """Options that merely restate the adapter are fine; contradicting it is an error, not a silent override."""
    problems = []
    if model_card and model_card != config["model_card"]:
        problems.append(f"--model_card {model_card} (adapter: {config['model_card']})")
    if lora_dim and lora_dim != config["r"]:
        problems.append(f"--lora_dim {lora_dim} (adapter: {config['r']})")
    if lora_alpha is not None and float(lora_alpha) != float(config["alpha"]):
        problems.append(f"--lora_alpha {lora_alpha} (adapter: {config['alpha']})")
    if problems:
        raise InputError(f"options contradict the adapter config: {'; '.join(problems)}; drop them (the adapter "
                         "records its own)", source)


def _recorded_base(config: dict) -> str | None:
    path = (config.get("base") or {}).get("path")
    return path if path and Path(path).is_file() else None


# ----------------------------------------------------------------------------------------------- search


def make_query(context: Sequence[int], seq_len: int, eval_len: int) -> list[int]:
    """The original's query: the context ids left-truncated to their last seq_len - eval_len (room to generate)."""
    room = seq_len - eval_len
    if room < 1:
        raise InputError(f"--seq_len ({seq_len}) must exceed --eval_len ({eval_len}): the query needs room")
    return list(context[-room:])


def _autocast(device: torch.device, precision: str):
    """fp32 on the CPU by default, bf16 autocast on a GPU (`auto`); fp16 only when asked."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device_type=device.type, dtype=dtype)


def _batches(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def search_queries(
    model: GPT2,
    queries: Sequence[Sequence[int]],
    cfg: BeamConfig,
    batch_size: int = DEFAULT_BATCH_SIZE,
    precision: str = "auto",
    progress: bool = False,
) -> list[Hypothesis]:
    """Best hypothesis per query, in input order.

    One search per unique query; unique queries are sorted by length (little padding) and decoded `batch_size`
    at a time.
    """
    if batch_size < 1:
        raise InputError(f"--batch_size must be >= 1 (got {batch_size})")
    device = next(model.parameters()).device
    unique = sorted(dict.fromkeys(tuple(q) for q in queries), key=len, reverse=True)  # longest first: OOM shows early
    found: dict[tuple[int, ...], Hypothesis] = {}
    bar = tqdm(total=len(unique), unit="MR", desc="decode", disable=not progress, dynamic_ncols=True)
    with torch.inference_mode(), _autocast(device, precision), bar:
        for batch in _batches(unique, batch_size):
            found.update(zip(batch, beam_search(model, batch, cfg)))
            bar.update(len(batch))
    return [found[tuple(q)] for q in queries]


def generate_texts(
    model: GPT2,
    contexts: list[str],
    cfg: BeamConfig,
    *,
    seq_len: int = DEFAULT_SEQ_LEN,
    batch_size: int = DEFAULT_BATCH_SIZE,
    add_bos: bool = True,
    progress: bool = False,
    precision: str = "auto",
) -> list[str]:
    """Texts in, generated texts out (the MLflow pyfunc model calls this): one per context, cut and stripped.

    Contexts are encoded like the encode stage (`add_bos` appends <|endoftext|>, the original's separator),
    deduplicated, beam-decoded, and each result is cut at <|endoftext|> and the first blank line.
    """
    tokenizer = get_tokenizer()
    encoded = tokenizer.encode_batch(list(contexts))
    queries = [make_query(ids + [EOS_ID] if add_bos else ids, seq_len, cfg.eval_len) for ids in encoded]
    if any(not q for q in queries):
        raise InputError("an empty context with add_bos=False leaves nothing to condition on")
    hyps = search_queries(model, queries, cfg, batch_size, precision, progress)
    return [clean_text(tokenizer.decode(h.tokens)) for h in hyps]


# ----------------------------------------------------------------------------------------------- the stage


def read_contexts(path: str | os.PathLike, vocab_size: int) -> list[list[int]]:
    """Context ids of every line of an encoded JSONL ({"context": [ids], "completion": [ids]})."""
    contexts = []
    for line, item in iter_jsonl(path):
        context = item.get("context") if isinstance(item, dict) else None
        if not isinstance(context, list) or not context or not all(isinstance(t, int) and 0 <= t < vocab_size for t in context):
            raise InputError(f'expected {{"context": [token ids in 0..{vocab_size - 1}], ...}} (the encoded JSONL from '
                             "steps.encode; the formatted text file goes to --input_file)", path, line)
        contexts.append(context)
    if not contexts:
        raise InputError("no lines to decode", path)
    return contexts


def build_parser() -> argparse.ArgumentParser:
    search = BeamConfig()  # the search options' defaults
    p = argparse.ArgumentParser(
        description="Beam-decode an encoded test set with base weights + a LoRA adapter and write predictions "
        "(and, with --input_file, the scorer's reference/prediction files). Names follow the original gpt2_beam.py.",
    )
    p.add_argument("--data", required=True, help="encoded JSONL to decode ({'context': [ids], ...}, from steps.encode)")
    p.add_argument("--batch_size", type=int, default=DEFAULT_BATCH_SIZE, help="unique queries decoded together "
                   "(default %(default)s; each holds --beam rows; the original's README used 1 because of its batching "
                   "bug)")
    p.add_argument("--seq_len", type=int, default=DEFAULT_SEQ_LEN, help="the query keeps the last seq_len - eval_len "
                   "context ids (default %(default)s)")
    p.add_argument("--eval_len", type=int, default=search.eval_len, help="maximum generated tokens (default "
                   "%(default)s; the README uses 64)")
    p.add_argument("--min_length", type=int, default=search.min_length, help="forbid the eos ids before this many "
                   "tokens (default %(default)s)")
    p.add_argument("--model_card", default=None, help="gpt2.sm/md/lg/tiny; read from the adapter config, needed only "
                   "without an adapter (then default gpt2.sm, the original's)")
    p.add_argument("--init_checkpoint", default=None, help="base GPT-2 weights (model.safetensors or pytorch_model.bin); "
                   "default: the base path recorded in the adapter config")
    p.add_argument("--adapter", default=None, help="LoRA adapter: a directory with adapter.safetensors + "
                   "adapter_config.json, or an original model.<step>.pt")
    p.add_argument("--lora_dim", type=int, default=0, help="LoRA rank; read from the adapter (if given, must match)")
    p.add_argument("--lora_alpha", type=float, default=None, help="LoRA alpha; read from adapter_config.json. Original "
                   ".pt adapters do not record it: give it then (the README used 32; the original's default was 128)")
    p.add_argument("--ignore_base_mismatch", action="store_true", help="decode even if --init_checkpoint's sha256 "
                   "differs from the base the adapter was trained on")
    p.add_argument("--beam", type=int, default=search.beam, help="beam width K (default %(default)s; the README uses "
                   "10)")
    p.add_argument("--length_penalty", type=float, default=search.length_penalty, help="score = sum log p / "
                   "len**length_penalty, len counting the eos (default %(default)s; README 0.8)")
    p.add_argument("--no_repeat_ngram_size", type=int, default=search.no_repeat_ngram_size, help="ban repeating "
                   "n-grams of generated tokens (0: off; default %(default)s)")
    p.add_argument("--repetition_penalty", type=float, default=search.repetition_penalty, help="CTRL penalty on "
                   "generated tokens (1.0: off; default %(default)s)")
    p.add_argument("--eos_token_id", type=int, action="append", default=None, help="stop token; repeatable. As in the "
                   f"original, the list always starts with {', '.join(map(str, search.eos_token_ids))} and these are appended (E2E: "
                   "--eos_token_id 628)")
    p.add_argument("--work_dir", default=os.environ.get("PT_OUTPUT_DIR", "gpt2_model"), help="output directory "
                   "(default $PT_OUTPUT_DIR or gpt2_model)")
    p.add_argument("--output_file", default=None, help="also write the original's {'id', 'predict': [eval_len ids]} "
                   "file under work_dir (compatibility; off unless given)")
    p.add_argument("--input_file", default=None, help="the formatted JSONL of --data: also write the scorer files")
    p.add_argument("--ref_type", default="e2e", choices=DATASETS, help="scorer layout (default e2e)")
    p.add_argument("--ref_num", type=int, default=4, help="webnlg/dart: number of reference files (default 4)")
    p.add_argument("--lower", action="store_true", help="scorer files: lower-case (the README does for webnlg/dart)")
    p.add_argument("--tokenize", action="store_true", help="scorer files: split around punctuation")
    p.add_argument("--output_ref_file", default=None, help="default work_dir/refs.txt (e2e) or work_dir/refs/ "
                   "(webnlg/dart: a directory of reference0..N-1)")
    p.add_argument("--output_pred_file", default=None, help="default work_dir/preds.txt")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default cuda when available)")
    p.add_argument("--precision", default="auto", choices=PRECISIONS, help="auto = bf16 autocast on GPU, fp32 on CPU")
    return p


def run(args: argparse.Namespace) -> str:
    """The stage; returns the summary line."""
    start = time.perf_counter()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        cfg = BeamConfig.from_settings(vars(args))
    except ValueError as exc:  # before loading anything: a bad option costs a second, not a decode
        raise InputError(f"bad search option: {exc}") from None
    require_writable(args.work_dir)  # a read-only output dir fails now, not after the search
    model = load_for_inference(args.adapter, args.init_checkpoint, device, args.model_card, args.lora_dim,
                               args.lora_alpha, args.ignore_base_mismatch)
    if max(cfg.eos_token_ids) >= model.config.vocab_size:
        raise InputError(f"--eos_token_id {max(cfg.eos_token_ids)} is outside the vocabulary ({model.config.vocab_size})")
    if args.seq_len > model.config.n_positions:
        raise InputError(f"--seq_len {args.seq_len} exceeds the model's {model.config.n_positions} positions")
    contexts = read_contexts(args.data, model.config.vocab_size)
    if args.input_file:  # fail before the long search, not after it
        _check_same_length(args.input_file, len(contexts), args.data)
    queries = [make_query(c, args.seq_len, args.eval_len) for c in contexts]
    n_unique = len(set(map(tuple, queries)))
    loaded = time.perf_counter()
    hyps = search_queries(model, queries, cfg, args.batch_size, args.precision, progress=True)
    searched = time.perf_counter() - loaded

    tokenizer = get_tokenizer()
    work_dir = Path(args.work_dir)
    texts = [clean_text(tokenizer.decode(h.tokens)) for h in hyps]
    with atomic_write(work_dir / "predictions.jsonl") as f:
        for i, (context, text) in enumerate(zip(contexts, texts)):
            f.write(json.dumps({"id": i, "context": clean_context(tokenizer.decode(context)), "prediction": text},
                               ensure_ascii=False) + "\n")
    written = [str(work_dir / "predictions.jsonl")]
    if args.output_file:
        with atomic_write(work_dir / args.output_file) as f:
            for i, h in enumerate(hyps):
                f.write(json.dumps({"id": i, "predict": h.tokens + [0] * (args.eval_len - len(h.tokens))}) + "\n")
        written.append(str(work_dir / args.output_file))
    if args.input_file:
        multi = args.ref_type != "e2e"
        ref_file = args.output_ref_file or str(work_dir / ("refs" if multi else "refs.txt"))
        pred_file = args.output_pred_file or str(work_dir / "preds.txt")
        examples_file = work_dir / EXAMPLES_FILE
        write_scorer_files(args.input_file, dict(enumerate(texts)), ref_file, pred_file, args.ref_type, args.ref_num,
                           lower=args.lower, tokenize=args.tokenize, examples_file=examples_file)
        written += [str(examples_file), ref_file, pred_file]
    finished = sum(h.finished for h in hyps)
    return (f"decode: {len(queries)} lines, {n_unique} unique queries, beam {args.beam}, {n_unique / searched:.2f} MRs/s "
            f"({searched:.1f} s search, {time.perf_counter() - start:.1f} s total, {device}); {finished} lines ended "
            f"on eos, {len(hyps) - finished} cut at eval_len -> {', '.join(written)}")


def clean_context(text: str) -> str:
    """The context as text, without the trailing <|endoftext|> separator the encode stage appended."""
    return text.removesuffix("<|endoftext|>")


def _check_same_length(input_file: str, n_data: int, data: str) -> None:
    n_input = sum(1 for _ in iter_jsonl(input_file))
    if n_input != n_data:
        raise InputError(f"has {n_input} lines but --data {data} has {n_data}; --input_file must be the formatted "
                         "file that --data was encoded from", input_file)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_stage(lambda: print(run(args)))


if __name__ == "__main__":
    from steps.core import runtime

    runtime.keep_large_allocations()  # here, not in main(): tests call main() in their own process
    sys.exit(main())
