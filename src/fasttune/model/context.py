"""A model's context: the longest sequence its config says it is made for, RoPE scaling counted.

transformers reads `max_position_embeddings` as the scaled context for every RoPE type but YaRN and dynamic NTK,
whose `original_max_position_embeddings` defaults to it: Qwen2.5/Qwen3 extend their 32768 positions to 131072 by
adding `{"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}` to config.json, leaving
`max_position_embeddings` at 32768 (Qwen3's config says 40960: transformers warns that 40960 / 32768 is not the
factor, and its YaRN takes the factor as given, so 4 x 32768 = 131072 either way). Llama 3.1's llama3 scaling,
linear and longrope configs already name the scaled length in `max_position_embeddings` (131072 for Llama 3.1).
MPT names its context `max_seq_len` (its ALiBi table; a longer row fails in its attention).
"""

from __future__ import annotations

EXTENDING_ROPE = ("yarn", "dynamic")
"""RoPE types whose factor extends the context beyond a max_position_embeddings that equals the original one."""


def _rope(config) -> dict:
    """The config's RoPE parameters (transformers 5's rope_parameters, or rope_scaling); per-layer-type ones (Gemma
    3: full and sliding attention) as the one that scales most."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if not isinstance(rope, dict):
        return {}
    if rope and all(isinstance(v, dict) for v in rope.values()):
        return max(rope.values(), key=lambda r: float(r.get("factor") or 1.0), default={})
    return rope


def _positions(config) -> tuple[str, int | None]:
    """(the config field that names the context, its value): max_position_embeddings, or MPT's max_seq_len (the
    length of its ALiBi table: a longer row fails in its attention with a tensor size mismatch)."""
    for name in ("max_position_embeddings", "max_seq_len"):
        if value := getattr(config, name, None):
            return name, value
    return "max_position_embeddings", None


def _per_layer_type(config) -> bool:
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    return isinstance(rope, dict) and bool(rope) and all(isinstance(v, dict) for v in rope.values())


def context_length(config) -> int | None:
    """The model's context in tokens: max_position_embeddings, or a YaRN or dynamic-NTK factor times the original
    context where that is longer (see the module's docstring); None when the config names no context."""
    base = _positions(config)[1]
    if not base:
        return None
    rope = _rope(config)
    kind, factor = rope.get("rope_type", rope.get("type")), rope.get("factor")
    original = rope.get("original_max_position_embeddings") or base
    if kind in EXTENDING_ROPE and isinstance(factor, int | float) and factor > 1:
        return max(int(base), int(original * factor))  # Qwen3: 40960 positions, YaRN 4 x 32768 = 131072
    return int(base)


def describe_context(config) -> str:
    """Where context_length comes from, for messages: "max_position_embeddings=32768" or "max_position_embeddings=
    32768 x yarn factor 4.0 = 131072"."""
    (field, base), context = _positions(config), context_length(config)
    if context == base:
        return f"{field}={base}"
    rope = _rope(config)
    kind, original = rope.get("rope_type", rope.get("type")), rope.get("original_max_position_embeddings")
    scaled = f"original_max_position_embeddings={original}" if original and original != base else None
    scaled = scaled or f"max_position_embeddings={base}"
    return f"{scaled} x {kind} factor {rope.get('factor')} = {context}"


def too_long(config, length: int, source: str, option: str = "--data.max-length", file: str | None = None) -> str:
    """One line for `length` (given as `option`, or as data.max_length in the --config `file`) beyond the context of
    the model at `source`, with the fixes."""
    context, base = context_length(config), _positions(config)[1]
    option = f"{file}: data.max_length" if file else option
    fix = f"set it to {context} or less" if file else f"pass {option} {context} or less"
    kind = _rope(config).get("rope_type", "none")
    # plain RoPE: a config change extends it; not one set per layer type (Gemma 3), whose layers would each keep
    # their own RoPE beside a flat rope_parameters edit, while the config read as extended
    if kind == "default" and context == base and not _per_layer_type(config):
        # as transformers 5's rope_parameters with the model's rope_theta: beside the rope_parameters it saves,
        # a rope_scaling replaced them, rope_theta included (500000 -> its default 10000: another model)
        theta = _rope(config).get("rope_theta") or getattr(config, "rope_theta", None)
        theta = f', "rope_theta": {float(theta)}' if theta else ""
        fix += (
            f', or extend the model\'s context in its config.json (YaRN: "rope_parameters": {{"rope_type": '
            f'"yarn", "factor": {-(-length // base)}.0, "original_max_position_embeddings": {base}{theta}}})'
        )
    return f"{option} {length} exceeds the context of {source} ({describe_context(config)}); {fix}"


def too_long_for_run(config, length: int, source: str, run: str) -> str:
    """One line for a resumed run whose data.max_length `length` (recorded in its config.json `run`) exceeds the
    context of the model at `source`: resume keeps the length (its samples are the checkpoint's), so the fix is a
    model of that context, the run's own, not a shorter length nor a RoPE edit (another model than the run's)."""
    return (f"--resume: the run trained with data.max_length {length} (in {run}), beyond the context of {source} "
            f"({describe_context(config)}); give a model of {length} positions or more (the run's own), or start a new "
            "run with another --output-dir")  # fmt: skip
