"""Load Llama-family weights into the NNX model: HF safetensors folders and GGUF files.

Both paths produce a flat ``{"layers.3.self_attn.q_proj.kernel": ndarray}`` dict in our layout
([in, out] kernels, HF's rotary layout), then fill an abstract model. Converted parameters are
cached with orbax-checkpoint, keyed by the source file's identity and dtype, so the second start
skips dequantisation and transposes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from cara_jax.config import ModelConfig, RopeScaling, UnsupportedModelError
from cara_jax.model import Llama

log = logging.getLogger(__name__)

# the weight dtypes a model can be loaded in, by the name flags and the API use
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

CACHE_FORMAT = 1
_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


class WeightsError(ValueError):
    """The checkpoint is missing tensors, has wrong shapes, or cannot be read."""


@dataclasses.dataclass
class LoadedModel:
    cfg: ModelConfig
    graphdef: nnx.GraphDef
    state: nnx.State
    source: Path
    dtype: jnp.dtype

    def model(self) -> Llama:
        return nnx.merge(self.graphdef, self.state)

    def kernels(self) -> dict[str, jax.Array]:
        """Each projection's [layers, in, out] kernels: the arrays the model runs on."""
        layers = nnx.to_pure_dict(self.state)["layers"]
        parent = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
                  "o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
        return {p: layers[parent[p]][p]["kernel"] for p in self.cfg.projection_shapes()}


    def vocab_sums(self) -> dict[str, np.ndarray]:
        """Row sums [vocab] of the embedding and of the LM head's weights (the embedding's,
        when tied): what an adapter that carries these modules' base weights must match."""
        pure = nnx.to_pure_dict(self.state)
        emb = jnp.sum(pure["embed_tokens"].astype(jnp.float32), axis=1)
        head = emb if self.cfg.tie_word_embeddings else jnp.sum(
            pure["lm_head"]["kernel"].astype(jnp.float32), axis=0)  # fmt: skip
        return {"embed_tokens": np.asarray(emb), "lm_head": np.asarray(head)}


def _progress(items: list, desc: str) -> Iterator:
    return iter(tqdm(items, desc=desc, unit="tensor", leave=False, disable=None))


# ---------------------------------------------------------------- HF safetensors folders


def _hf_config(folder: Path) -> ModelConfig:
    path = folder / "config.json"
    if not path.is_file():
        raise WeightsError(f"{folder} has no config.json")
    return ModelConfig.from_hf(json.loads(path.read_text()))


def _hf_tensors(folder: Path, cfg: ModelConfig) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        raise WeightsError(f"{folder} has no *.safetensors files (pickle .bin is not loaded)")
    raw: dict[str, np.ndarray] = {}
    handles = [safe_open(str(folder / f), framework="np") for f in files]
    names = [(h, k) for h in handles for k in h.keys()]
    for h, k in _progress(names, "reading safetensors"):
        raw[k] = h.get_tensor(k)
    return _from_hf_names(raw, cfg)


def _from_hf_names(raw: dict[str, np.ndarray], cfg: ModelConfig) -> dict[str, np.ndarray]:
    def take(name: str) -> np.ndarray:
        if name not in raw:
            raise WeightsError(f"missing tensor {name}")
        return np.asarray(raw[name], dtype=np.float32)

    out = {
        "embed_tokens": take("model.embed_tokens.weight"),
        "norm.weight": take("model.norm.weight"),
    }
    if not cfg.tie_word_embeddings:
        out["lm_head.kernel"] = take("lm_head.weight").T
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            out[f"layers.{i}.{norm}.weight"] = take(p + norm + ".weight")
        for mod in _LAYER_NAMES:
            out[f"layers.{i}.{mod}.kernel"] = take(p + mod + ".weight").T
    return out


# ---------------------------------------------------------------- GGUF


def _gguf_field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def gguf_config(reader) -> ModelConfig:
    arch = _gguf_field(reader, "general.architecture")
    if arch != "llama":
        raise UnsupportedModelError(f"GGUF architecture {arch!r} is not llama")
    g = lambda k, d=None: _gguf_field(reader, f"llama.{k}", d)  # noqa: E731
    n_heads = int(g("attention.head_count"))
    hidden = int(g("embedding_length"))
    vocab = g("vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    names = {t.name for t in reader.tensors}
    scaling = None
    if g("rope.scaling.type") == "linear":
        scaling = {"rope_type": "linear", "factor": float(g("rope.scaling.factor", 1.0))}
    return ModelConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(g("feed_forward_length")),
        num_layers=int(g("block_count")),
        num_heads=n_heads,
        num_kv_heads=int(g("attention.head_count_kv", n_heads)),
        head_dim=int(g("rope.dimension_count", hidden // n_heads)),
        rope_theta=float(g("rope.freq_base", 10000.0)),
        rope_scaling=RopeScaling.from_hf(scaling),
        rms_norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-5)),
        tie_word_embeddings="output.weight" not in names,
        max_position_embeddings=int(g("context_length", 2048)),
        name=str(_gguf_field(reader, "general.name", "llama")),
    )


def unpermute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (interleaved rotary pairs -> HF's rotate-half)."""
    rest = w.shape[1:]
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def _gguf_tensors(path: Path) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    import gguf

    reader = gguf.GGUFReader(str(path))
    cfg = gguf_config(reader)
    by_name = {t.name: t for t in reader.tensors}
    raw: dict[str, np.ndarray] = {}
    for t in _progress(list(reader.tensors), "dequantizing GGUF"):
        raw[t.name] = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)

    def take(name: str) -> np.ndarray:
        if name not in by_name:
            raise WeightsError(f"missing tensor {name} in {path.name}")
        return raw[name]

    out = {"embed_tokens": take("token_embd.weight"), "norm.weight": take("output_norm.weight")}
    if not cfg.tie_word_embeddings:
        out["lm_head.kernel"] = take("output.weight").T
    for i in range(cfg.num_layers):
        b = f"blk.{i}."
        out[f"layers.{i}.input_layernorm.weight"] = take(b + "attn_norm.weight")
        out[f"layers.{i}.post_attention_layernorm.weight"] = take(b + "ffn_norm.weight")
        for mod, gname in _LAYER_NAMES.items():
            w = take(b + gname + ".weight")
            if gname == "attn_q":
                w = unpermute_rotary(w, cfg.num_heads)
            elif gname == "attn_k":
                w = unpermute_rotary(w, cfg.num_kv_heads)
            out[f"layers.{i}.{mod}.kernel"] = w.T
    return cfg, out


# ---------------------------------------------------------------- assembly and cache


def _flat_to_pure(flat: dict[str, np.ndarray]) -> dict:
    pure: dict = {}
    for key, arr in flat.items():
        parts = key.split(".")
        node = pure
        for p in parts[:-1]:
            node = node.setdefault(int(p) if p.isdigit() else p, {})
        node[parts[-1]] = arr
    return pure


def stack_layers(flat: dict[str, np.ndarray], num_layers: int) -> dict[str, np.ndarray]:
    """Per-layer tensors (``layers.3.mlp.up_proj.kernel``) stacked on a leading axis into the
    model's layout (``layers.mlp.up_proj.kernel`` [layers, ...]); other keys are kept. A layer
    missing one of them is an error."""
    out, per = {}, {}
    for key, arr in flat.items():
        parts = key.split(".")
        if parts[0] == "layers" and len(parts) > 2 and parts[1].isdigit():
            per.setdefault(".".join(["layers", *parts[2:]]), {})[int(parts[1])] = arr
        else:
            out[key] = arr
    for key, by_layer in per.items():
        if sorted(by_layer) != list(range(num_layers)):
            missing = sorted(set(range(num_layers)) - set(by_layer))[:5]
            raise WeightsError(f"{key}: missing for layers {missing}")
        out[key] = np.stack([np.asarray(by_layer[i]) for i in range(num_layers)])
    return out


def build_model(cfg: ModelConfig, flat: dict[str, np.ndarray], dtype: jnp.dtype) -> LoadedModel:
    """Fill an abstract (never materialised) model with the given flat tensors (per-layer
    names, as the converters and the parameter cache hold them)."""
    flat = stack_layers(flat, cfg.num_layers)
    abstract = nnx.eval_shape(lambda: Llama(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    expected = {
        ".".join(str(p) for p in path): leaf.shape
        for path, leaf in jax.tree_util.tree_leaves_with_path(state.to_pure_dict())
        for path in [[getattr(k, "key", getattr(k, "idx", k)) for k in path]]
    }
    if set(expected) != set(flat):
        missing, extra = set(expected) - set(flat), set(flat) - set(expected)
        raise WeightsError(
            f"tensor names differ: missing {sorted(missing)[:5]}, extra {sorted(extra)[:5]}"
        )
    for k, shape in expected.items():
        if tuple(flat[k].shape) != tuple(shape):
            raise WeightsError(f"{k}: shape {flat[k].shape} != expected {shape}")
    arrays = {k: jnp.asarray(v, dtype=dtype) for k, v in flat.items()}
    state.replace_by_pure_dict(_flat_to_pure(arrays))
    return LoadedModel(cfg=cfg, graphdef=graphdef, state=state, source=Path(), dtype=dtype)


def cache_root() -> Path:
    root = os.environ.get("CARA_JAX_CACHE") or Path.home() / ".cache" / "cara_jax"
    return Path(root).expanduser().resolve() / "converted"


def _source_key(path: Path, dtype: jnp.dtype) -> str:
    files = (
        [path] if path.is_file() else sorted(path.glob("*.safetensors")) + [path / "config.json"]
    )
    h = hashlib.sha256(f"v{CACHE_FORMAT}:{jnp.dtype(dtype).name}".encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:24]


def _save_cache(dirpath: Path, cfg: ModelConfig, flat: dict[str, np.ndarray], dtype) -> None:
    import orbax.checkpoint as ocp

    tmp = dirpath.with_name(dirpath.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp / "params", {k: np.asarray(v, dtype=dtype) for k, v in flat.items()})
    (tmp / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    tmp.rename(dirpath)


def _load_cache(dirpath: Path) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    import orbax.checkpoint as ocp

    d = json.loads((dirpath / "config.json").read_text())
    d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
    with ocp.StandardCheckpointer() as ckpt:
        flat = ckpt.restore(dirpath / "params")
    return ModelConfig(**d), dict(flat)


def load_model(
    path: str | os.PathLike, dtype: jnp.dtype = jnp.float32, use_cache: bool = True
) -> LoadedModel:
    """Load an HF checkpoint folder or a GGUF file (the orbax cache makes later starts fast)."""
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"model path {path} does not exist")
    key_dir = cache_root() / _source_key(path, dtype)
    flat = None
    if use_cache and (key_dir / "config.json").is_file():
        try:
            cfg, flat = _load_cache(key_dir)
            log.info("loaded converted parameters from cache %s", key_dir.name)
        except Exception as e:  # a corrupt cache is rebuilt, never fatal
            log.warning("ignoring unreadable parameter cache %s: %s", key_dir, e)
            flat = None
    if flat is None:
        if path.is_file() and path.suffix == ".gguf":
            cfg, flat = _gguf_tensors(path)
        elif path.is_dir():
            cfg = _hf_config(path)
            flat = _hf_tensors(path, cfg)
        else:
            raise WeightsError(f"{path} is neither a .gguf file nor an HF checkpoint folder")
        if use_cache:
            try:
                _save_cache(key_dir, cfg, flat, dtype)
            except Exception as e:
                log.warning("could not write parameter cache %s: %s", key_dir, e)
    loaded = build_model(cfg, flat, dtype)
    loaded.source = path
    return loaded
