"""The vision tower against transformers' `Qwen3_5VisionModel` (the oracle), and its config.

A small random tower (norms away from 1, biases away from 0, learned positions as large as the patch embedding,
so every parameter matters) is built in torch; its state_dict is copied into `VisionTower` by parameter path,
with no renaming. Outputs must match within 1e-4 at fp32 (measured ~1e-6 on outputs of magnitude ~1),
gradients of every parameter within 1e-4 relative.
"""

import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from qwenjax import _compat
from qwenjax.config import VISION_ACTIVATIONS, ConfigError, VisionConfig, config_from_dict, vision_config_from_dict
from qwenjax.model.vision import ACTIVATIONS, VisionTower, patch_rows_cols, position_interpolation
from qwenjax.sharding import ShardingRules, make_mesh, param_shardings
from qwenjax.testing import randomize_vision_, vision_tower_from_hf

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from transformers.activations import ACT2FN  # noqa: E402
from transformers.models.qwen3_5.configuration_qwen3_5 import Qwen3_5VisionConfig  # noqa: E402
from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5VisionModel  # noqa: E402
from transformers.vision_utils import get_vision_interpolation_indices_and_weights, get_vision_position_ids  # noqa: E402

TOL = 1e-4
TINY = dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=64, patch_size=4, temporal_patch_size=2,
            spatial_merge_size=2, num_position_embeddings=16, out_hidden_size=48)

GRIDS = {  # (t, h, w) in patches per image; the learned table is 4 x 4, so most grids stretch it
    "one-image": [(1, 4, 6)],
    "two-images": [(1, 4, 6), (1, 2, 8)],
    "video-t2": [(2, 4, 4)],
    # a video between two images whose frames have one size (24): one attention batch across a gap
    "image-video-image": [(1, 4, 6), (2, 2, 8), (1, 6, 4)],
}


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    hf = Qwen3_5VisionModel(Qwen3_5VisionConfig(**TINY)).eval()
    randomize_vision_(hf)
    return hf, vision_tower_from_hf(hf)


def _pixels(cfg: VisionConfig, grid, seed: int = 0) -> np.ndarray:
    n = sum(t * h * w for t, h, w in grid)
    return np.random.default_rng(seed).standard_normal((n, cfg.patch_dim), dtype=np.float32)


def _forward(tower: VisionTower, pixels, grid) -> jax.Array:
    """The tower's output, compiled (op-by-op dispatch is many times slower); the grid is static."""
    graphdef, state = nnx.split(tower)
    return jax.jit(lambda state, pixels: nnx.merge(graphdef, state)(pixels, grid))(state, jnp.asarray(pixels))


def _reference(hf, pixels, grid) -> torch.Tensor:
    # The forward returns last_hidden_state (the blocks' output, one row per patch) and pooler_output (the
    # merger's: one row per merge block): the latter is what the language model receives.
    return hf(torch.from_numpy(pixels), grid_thw=torch.tensor(grid)).pooler_output


@pytest.mark.parametrize("name", sorted(GRIDS))
def test_matches_transformers(models, name):
    hf, tower = models
    grid = np.array(GRIDS[name])
    pixels = _pixels(tower.config, grid, seed=len(name))
    with torch.no_grad():
        want = _reference(hf, pixels, grid).numpy()
    got = np.asarray(_forward(tower, pixels, grid))
    assert got.shape == (len(pixels) // 4, TINY["out_hidden_size"]) == want.shape
    err = np.abs(got - want).max()
    print(f"{name}: max abs error {err:.2e} (outputs up to {np.abs(want).max():.2f})")
    assert err <= TOL


@pytest.mark.parametrize("side, grid", [(4, GRIDS["image-video-image"]), (48, [(1, 36, 52), (3, 2, 96)])])
def test_static_tables_match_transformers(side, grid):
    """Learned-position taps and weights bit-equal to transformers'; rotary positions equal."""
    cfg = VisionConfig(num_position_embeddings=side * side)
    grid = np.array(grid)
    indices, weights = position_interpolation(grid, cfg)
    want_indices, want_weights = get_vision_interpolation_indices_and_weights(
        torch.tensor(grid), num_grid_per_side=side, mode="bilinear", align_corners=True, spatial_merge_size=2)
    np.testing.assert_array_equal(indices, want_indices.numpy())
    np.testing.assert_array_equal(weights, want_weights.numpy())
    np.testing.assert_array_equal(np.stack(patch_rows_cols(grid, 2), axis=-1),
                                  get_vision_position_ids(torch.tensor(grid), 2).numpy())


def test_gradients_match_transformers(models):
    hf, tower = models
    grid = np.array(GRIDS["image-video-image"])
    pixels = _pixels(tower.config, grid, seed=1)
    probe = np.random.default_rng(2).standard_normal((len(pixels) // 4, TINY["out_hidden_size"]), np.float32)

    hf.zero_grad()
    (_reference(hf, pixels, grid) * torch.from_numpy(probe)).sum().backward()
    want = {k: p.grad.numpy() for k, p in hf.named_parameters()}

    graphdef, params, rest = nnx.split(tower, nnx.Param, ...)

    def loss(params):
        return jnp.sum(nnx.merge(graphdef, params, rest)(jnp.asarray(pixels), grid) * probe)

    grads = {".".join(map(str, p)): np.asarray(_compat.variable_value(v))
             for p, v in _compat.variable_items(jax.jit(jax.grad(loss))(params))}
    assert set(grads) == set(want)
    rel = {k: np.abs(grads[k] - want[k]).max() / np.abs(want[k]).max() for k in want}
    worst = max(rel, key=rel.get)
    print(f"gradients: worst relative error {rel[worst]:.2e} ({worst})")
    assert rel[worst] <= TOL


def test_jit_equals_eager(models):
    _, tower = models
    grid = np.array(GRIDS["one-image"])
    pixels = jnp.asarray(_pixels(tower.config, grid, seed=3))
    np.testing.assert_allclose(np.asarray(_forward(tower, pixels, grid)), np.asarray(tower(pixels, grid)),
                               rtol=0, atol=1e-5)
    # A traced grid cannot give static shapes: refused with a message saying what to do.
    with pytest.raises(TypeError, match="grid_thw must be host integers"):
        jax.jit(lambda pixels, g: tower(pixels, g))(pixels, jnp.asarray(grid))


def test_sharded_forward_equals_single_device(models):
    """The parameters' logical axes give a valid layout over a mesh, and the result does not change."""
    _, tower = models
    grid = np.array(GRIDS["two-images"])
    pixels = jnp.asarray(_pixels(tower.config, grid, seed=4))
    graphdef, state = nnx.split(tower)
    sharded = jax.device_put(state, param_shardings(state, make_mesh("fsdp=2,tensor=4"), ShardingRules()))
    assert sharded["blocks"][0]["attn"]["qkv"]["weight"][...].sharding.spec == P("tensor", "fsdp")
    got = jax.jit(lambda state, pixels: nnx.merge(graphdef, state)(pixels, grid))(sharded, pixels)
    np.testing.assert_allclose(np.asarray(got), np.asarray(_forward(tower, pixels, grid)), rtol=0, atol=2e-5)


def test_bad_inputs_are_refused(models):
    _, tower = models
    pixels = jnp.asarray(_pixels(tower.config, [(1, 4, 6)]))
    with pytest.raises(ValueError, match=r"pixel_values must be \[patches, C\*T\*P\*P\] = \[24, 96\]"):
        tower(pixels[:20], np.array([(1, 4, 6)]))
    with pytest.raises(ValueError, match="multiples of spatial_merge_size=2"):
        tower(pixels, np.array([(1, 3, 8)]))
    with pytest.raises(ValueError, match=r"grid_thw must be integers of shape \[n, 3\]"):
        tower(pixels, np.array([4, 6]))


def test_bf16_tower_runs_in_bf16(models):
    """bf16 weights and compute: a bf16 result near the fp32 one (norms, softmax, rotary stay fp32 inside)."""
    hf, tower = models
    grid = np.array(GRIDS["two-images"])
    pixels = jnp.asarray(_pixels(tower.config, grid))
    low = vision_tower_from_hf(hf, param_dtype=jnp.bfloat16)
    got, want = _forward(low, pixels, grid), _forward(tower, pixels, grid)
    assert got.dtype == jnp.bfloat16
    assert float(jnp.abs(got.astype(jnp.float32) - want).max()) <= 0.05 * float(jnp.abs(want).max())


def test_activations_match_transformers():
    assert set(ACTIVATIONS) == set(VISION_ACTIVATIONS)
    x = np.linspace(-6, 6, 101, dtype=np.float32)
    for name, fn in ACTIVATIONS.items():
        want = ACT2FN[name](torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(np.asarray(fn(jnp.asarray(x))), want, rtol=0, atol=1e-6, err_msg=name)


# ---- config ------------------------------------------------------------------------------------------------------
def _same_as_transformers(ours: VisionConfig, theirs) -> None:
    for f in dataclasses.fields(VisionConfig):
        if f.name.startswith("rope_"):
            assert getattr(ours, f.name) == theirs.rope_parameters[f.name], f.name
        else:
            assert getattr(ours, f.name) == getattr(theirs, f.name), f.name


@pytest.mark.parametrize("kw", [{}, TINY, {**TINY, "rope_parameters": {"rope_type": "axial", "rope_theta": 500.0}}])
def test_config_reads_transformers_dict(kw):
    hf = Qwen3_5VisionConfig(**kw)
    _same_as_transformers(vision_config_from_dict(hf.to_dict()), hf)


def test_config_defaults_are_transformers():
    assert vision_config_from_dict({}) == VisionConfig()
    _same_as_transformers(VisionConfig(), Qwen3_5VisionConfig())
    # An older config.json: rope_theta at the top level, no rope_parameters.
    assert vision_config_from_dict({"rope_theta": 123.0}).rope_theta == 123.0
    assert Qwen3_5VisionConfig(rope_theta=123.0).rope_parameters["rope_theta"] == 123.0


def test_a_multimodal_config_types_its_vision_config():
    text = {k: v for k, v in json.load(open("configs/tiny.json")).items() if k != "architectures"}
    raw = {**TINY, "model_type": "qwen3_5_vision", "deepstack_visual_indexes": []}
    cfg = config_from_dict({"architectures": ["Qwen3_5ForConditionalGeneration"], "text_config": text,
                            "vision_config": raw, "image_token_id": 7})
    assert cfg.vision == VisionConfig(**TINY) and cfg.image_token_id == 7
    assert config_from_dict(text).vision is None


@pytest.mark.parametrize("edit, field", [
    ({"depth": "2"}, "vision_config.depth"),                       # a string is not an int, never coerced
    ({"depth": 0}, "vision_config.depth"),
    ({"hidden_size": 32, "num_heads": 5}, "vision_config.num_heads"),  # 5 heads do not divide 32
    ({"hidden_size": 24, "num_heads": 4}, "vision_config.num_heads"),  # head_dim 6: not a multiple of 4
    ({"num_position_embeddings": 15}, "vision_config.num_position_embeddings"),
    ({"hidden_act": "relu"}, "vision_config.hidden_act"),
    ({"patch_size": [16, 16]}, "vision_config.patch_size"),
    ({"out_hidden_size": 2.0}, "vision_config.out_hidden_size"),
    ({"rope_parameters": {"rope_type": "yarn"}}, "vision_config.rope_parameters.rope_type"),
    ({"rope_parameters": {"rope_theta": "1e4"}}, "vision_config.rope_parameters.rope_theta"),
    ({"head_dim": 64}, "vision_config.head_dim"),                 # hidden 1152 / 16 heads = 72
])
def test_bad_config_names_the_field(edit, field):
    with pytest.raises(ConfigError, match=re.escape(f"`{field}`")):
        vision_config_from_dict(edit)
    with pytest.raises(ConfigError, match="`vision_config`: must be an object"):
        vision_config_from_dict([1])
