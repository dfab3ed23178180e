"""The scanned decoder: equal to its unrolled step, blind to padding, able to learn."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxcap.models.captioner import Captioner
from jaxcap.models.decoder import CaptionDecoder
from jaxcap.train import loss_terms

VOCAB, FEATURES = 23, 12


def _model(dropout=0.0):
    return Captioner(CaptionDecoder(vocab_size=VOCAB, feature_dim=FEATURES, embed_dim=6,
                                    hidden_dim=16, attention_dim=10, dropout_rate=dropout))


def _batch(rng, batch=4, length=9, real=(9, 6, 4, 7)):
    tokens = rng.integers(4, VOCAB, (batch, length)).astype(np.int32)
    tokens[:, 0] = 1
    for row, n in enumerate(real):
        tokens[row, n - 1] = 2
        tokens[row, n:] = 0
    return {"features": rng.normal(size=(batch, 3, 3, FEATURES)).astype(np.float32),
            "tokens": tokens, "weights": np.ones(batch, np.float32),
            "image_index": np.arange(batch, dtype=np.int32)}


@pytest.fixture
def setup(rng):
    model = _model()
    batch = _batch(rng)
    variables = model.init(jax.random.PRNGKey(0), batch["features"], batch["tokens"][:, :-1])
    return model, variables, batch


def test_scan_equals_a_python_loop_over_the_step(setup):
    model, variables, batch = setup
    logits, alphas = model.apply(variables, batch["features"], batch["tokens"])
    decoder = model.decoder
    bound = decoder.bind({"params": variables["params"]["decoder"]})
    regions, projected, carry = bound.start(batch["features"])
    gates = bound.word_gates(bound.embed(batch["tokens"]))
    for t in range(batch["tokens"].shape[1]):
        carry, (h, alpha) = bound.step(carry, gates[:, t], projected, regions)
        np.testing.assert_allclose(bound.logits(h, train=False), logits[:, t], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(alpha, alphas[:, t], rtol=1e-5, atol=1e-6)
    # decode_step, used by the search, is the same step fed by a token.
    carry = bound.start(batch["features"])[2]
    _, step_logits, _ = bound.decode_step(batch["tokens"][:, 0], carry, projected, regions)
    np.testing.assert_allclose(step_logits, logits[:, 0], rtol=1e-5, atol=1e-5)


def test_extra_padding_changes_neither_loss_nor_gradients(setup):
    model, variables, batch = setup
    padded = dict(batch, tokens=np.pad(batch["tokens"], ((0, 0), (0, 6))))

    def loss(params, b):
        ce, penalty, tokens, examples = loss_terms(model, {"params": params}, b, 1.0, 0.0, False)
        return ce / tokens + penalty / examples

    value, grads = jax.value_and_grad(loss)(variables["params"], batch)
    value_padded, grads_padded = jax.value_and_grad(loss)(variables["params"], padded)
    np.testing.assert_allclose(value, value_padded, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 grads, grads_padded)
    # Padding *examples* (weight 0) are ignored too.
    extra = {k: np.concatenate([v, v[:2]]) for k, v in batch.items()}
    extra["weights"][-2:] = 0
    extra["tokens"][-2:, 1:] = np.random.default_rng(9).integers(4, VOCAB, (2, 8))
    np.testing.assert_allclose(loss(variables["params"], extra), value, rtol=1e-6)


def test_overfits_one_small_batch(setup):
    model, variables, batch = setup
    tx = optax.adam(1e-2)
    params, opt_state = variables["params"], tx.init(variables["params"])

    @jax.jit
    def step(params, opt_state):
        def loss(params):
            ce, _, tokens, _ = loss_terms(model, {"params": params}, batch, 0.0, 0.0, False)
            return ce / tokens
        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, value

    first = None
    for _ in range(300):
        params, opt_state, value = step(params, opt_state)
        first = value if first is None else first
    assert first > 2.5 and value < 0.02


def test_attention_weights_are_distributions(setup):
    model, variables, batch = setup
    _, alphas = model.apply(variables, batch["features"], batch["tokens"])
    assert alphas.shape == (4, 9, 9)
    np.testing.assert_allclose(np.asarray(alphas).sum(-1), 1.0, rtol=1e-5)


def test_unknown_attention_variant_is_refused(rng):
    model = Captioner(CaptionDecoder(vocab_size=5, feature_dim=4, variant="hard"))
    with pytest.raises(ValueError, match="unknown attention variant 'hard'"):
        model.init(jax.random.PRNGKey(0), jnp.zeros((1, 2, 2, 4)), jnp.zeros((1, 3), jnp.int32))


def _unrolled(model, variables, features, tokens):
    """The decoder as a Python loop over its step: what JAX's own autodiff differentiates."""
    bound = model.decoder.bind({"params": variables["params"]["decoder"]})
    regions, projected, carry = bound.start(features)
    gates = bound.word_gates(bound.embed(tokens))
    hidden, alphas = [], []
    for t in range(gates.shape[1]):
        carry, (h, alpha) = bound.step(carry, gates[:, t], projected, regions)
        hidden.append(h)
        alphas.append(alpha)
    return bound.logits(jnp.stack(hidden, 1), False), jnp.stack(alphas, 1)


def test_hand_written_backward_equals_autodiff_of_the_unrolled_step(setup):
    model, variables, batch = setup
    inputs, targets = batch["tokens"][:, :-1], batch["tokens"][:, 1:]
    mask = (targets != 0).astype(jnp.float32)

    def loss_of(logits, alphas):
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        mass = jnp.einsum("btp,bt->bp", alphas, mask)
        # Both outputs' cotangents matter: the hidden states' and the attention weights'.
        return jnp.sum(ce * mask) / mask.sum() + jnp.sum(jnp.sin(3 * mass))

    def scanned(params, features):
        return loss_of(*model.apply({"params": params}, features, inputs))

    def unrolled(params, features):
        return loss_of(*_unrolled(model, {"params": params}, features, inputs))

    # Parameters, and the features (whose gradient fine-tuning the encoder needs).
    ours = jax.grad(scanned, argnums=(0, 1))(variables["params"], batch["features"])
    reference = jax.grad(unrolled, argnums=(0, 1))(variables["params"], batch["features"])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(  # float32 rounding, to scale
        a, b, rtol=2e-5, atol=1e-6 * float(np.abs(b).max())), ours, reference)
