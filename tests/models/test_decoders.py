"""Every decoder variant: shapes, the loop equals its step, blind to padding, able to learn,
beam 1 is greedy, beam 3 scores its captions as teacher forcing does; soft's fast path
equals the generic one; hard's gradient is unbiased."""

import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from jaxcap import configs
from jaxcap.decode import beam_search, greedy, word_logp
from jaxcap.models.captioner import Captioner
from jaxcap.models.decoders import VARIANTS, make_decoder
from jaxcap.train.steps import loss_terms

VOCAB, FEATURES, GRID = 23, 12, 3


def _config(variant: str, dropout: float = 0.0, **own) -> ml_collections.ConfigDict:
    config = configs.load("shapes").decoder
    config.update(variant=variant, embed_dim=6, hidden_dim=16, attention_dim=10, dropout=dropout)
    config.transformer.update(width=16, heads=2, mlp_dim=24, dropout_rate=dropout)
    config[variant].update(own)
    return config


def _model(variant: str, dropout: float = 0.0, **own) -> Captioner:
    return Captioner(make_decoder(_config(variant, dropout, **own), VOCAB, FEATURES))


def _batch(rng, batch=4, length=9, real=(9, 6, 4, 7)):
    tokens = rng.integers(4, VOCAB, (batch, length)).astype(np.int32)
    tokens[:, 0] = 1
    for row, n in enumerate(real):
        tokens[row, n - 1] = 2
        tokens[row, n:] = 0
    return {"features": rng.normal(size=(batch, GRID, GRID, FEATURES)).astype(np.float32),
            "tokens": tokens, "weights": np.ones(batch, np.float32)}


def _init(model, batch):
    return model.init(jax.random.PRNGKey(0), batch["features"], batch["tokens"][:, :-1])


def _loss(model, variables, batch, train=False, rng=None):
    """The trainer's loss (each term over its count) and the updated batch_stats."""
    terms, counts, batch_stats = loss_terms(model, variables, batch, 0.0, train, rng)
    return sum(value / counts[per] for value, per in terms.values()), batch_stats


variants = pytest.mark.parametrize("variant", list(VARIANTS))


@variants
def test_outputs_have_the_protocol_shapes(variant, rng):
    model, batch = _model(variant), _batch(rng)
    variables = _init(model, batch)
    outputs = jax.jit(model.apply)(variables, batch["features"], batch["tokens"])
    assert outputs["logits"].shape == (4, 9, VOCAB)
    assert outputs["alphas"].shape == (4, 9, GRID * GRID)
    total = np.asarray(outputs["alphas"]).sum(-1)
    if variant == "adaptive":  # the sentinel takes the rest
        assert np.all(total <= 1 + 1e-5) and np.all(total > 0)
    else:
        np.testing.assert_allclose(total, 1.0, rtol=1e-5)


@variants
def test_the_teacher_forced_pass_equals_a_python_loop_over_the_decoding_step(variant, rng):
    """The scan (or, for the transformer, all positions at once) against ``decode_step``
    called word by word, as every search calls it."""
    model, batch = _model(variant), _batch(rng)
    variables = _init(model, batch)
    tokens = jnp.asarray(batch["tokens"])
    outputs = model.apply(variables, batch["features"], tokens)
    context, state = model.apply(variables, batch["features"], tokens.shape[1],
                                 method=Captioner.start)
    for t in range(tokens.shape[1]):
        state, logits, alpha = model.apply(variables, context, state, tokens[:, t],
                                           method=Captioner.decode_step)
        np.testing.assert_allclose(logits, outputs["logits"][:, t], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(alpha, outputs["alphas"][:, t], rtol=1e-4, atol=1e-6)


@variants
def test_extra_padding_changes_neither_loss_nor_gradients(variant, rng):
    model, batch = _model(variant), _batch(rng)
    variables = _init(model, batch)
    padded = dict(batch, tokens=np.pad(batch["tokens"], ((0, 0), (0, 6))))

    def loss(params, b):
        return _loss(model, {**variables, "params": params}, b)[0]

    value, grads = jax.jit(jax.value_and_grad(loss))(variables["params"], batch)
    value_padded, grads_padded = jax.jit(jax.value_and_grad(loss))(variables["params"], padded)
    np.testing.assert_allclose(value, value_padded, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7),
                 grads, grads_padded)
    # Padding *examples* (weight 0) are ignored too.
    extra = {k: np.concatenate([v, v[:2]]) for k, v in batch.items()}
    extra["weights"][-2:] = 0
    extra["tokens"][-2:, 1:] = np.random.default_rng(9).integers(4, VOCAB, (2, 8))
    np.testing.assert_allclose(jax.jit(loss)(variables["params"], extra), value, rtol=1e-6)


@variants
def test_overfits_one_small_batch_with_its_own_loss_terms(variant, rng):
    """Training mode (a hard variant samples its regions and adds REINFORCE)."""
    model, batch = _model(variant), _batch(rng)
    variables = _init(model, batch)
    tx = optax.adam(1e-2)
    params, opt_state = variables["params"], tx.init(variables["params"])
    other = {k: v for k, v in variables.items() if k != "params"}

    @jax.jit
    def step(params, other, opt_state, key):
        def loss(params):
            value, batch_stats = _loss(model, {**other, "params": params}, batch, True, key)
            return value, batch_stats

        (_, batch_stats), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state)
        other = other if batch_stats is None else {"batch_stats": batch_stats}
        return optax.apply_updates(params, updates), other, opt_state

    def cross_entropy(params):
        terms, counts, _ = loss_terms(model, {**other, "params": params}, batch, 0.0, False)
        return float(terms["ce"][0] / counts["token"])

    first = cross_entropy(params)
    for i in range(300):
        params, other, opt_state = step(params, other, opt_state, jax.random.PRNGKey(i))
    assert first > 2.5 and cross_entropy(params) < 0.05


@variants
def test_beam_one_is_greedy(variant, rng):
    model, batch = _model(variant), _batch(rng)
    variables = jax.tree.map(lambda x: x * 3, _init(model, batch))  # peaked distributions
    tokens, scores, alphas = greedy(model, variables, batch["features"], 9)
    beam_tokens, beam_scores, beam_alphas = beam_search(model, variables, batch["features"], 1, 9)
    np.testing.assert_array_equal(tokens, beam_tokens)
    np.testing.assert_allclose(scores, beam_scores, rtol=1e-5)
    np.testing.assert_allclose(alphas, beam_alphas, rtol=1e-5, atol=1e-7)


@variants
def test_beam_search_returns_its_captions_teacher_forced_score_and_attention(variant, rng):
    """Beam 3 against teacher forcing of the captions it returns: every variant's state
    (an LSTM's, a transformer's cache) survives being shared by the beams after the
    first step and reordered between them."""
    model, batch = _model(variant), _batch(rng)
    variables = jax.tree.map(lambda x: x * 3, _init(model, batch))
    tokens, scores, alphas = beam_search(model, variables, batch["features"], 3, 9)
    outputs = model.apply(variables, batch["features"], tokens[:, :-1])
    logits = np.asarray(outputs["logits"])
    logp = np.asarray(word_logp(outputs["logits"]))
    for image in range(len(tokens)):
        emitted = [int(t) for t in tokens[image, 1:] if t != 0]
        # The search and teacher forcing compute each logit in programs of their own (a
        # step at a time against a state or cache, all positions at once), so each
        # log-probability may differ by float32 rounding of the logits it is taken from:
        # a few ulps of the largest (the transformer's reach 28 here: 3.7e-5 apart on an
        # Intel Xeon, 2.3e-5 on an AMD EPYC, over 8 words).
        ulps = np.finfo(np.float32).eps * np.abs(logits[image, :len(emitted)]).max(axis=-1)
        np.testing.assert_allclose(scores[image],
                                   sum(logp[image, t, w] for t, w in enumerate(emitted)),
                                   rtol=0, atol=32 * ulps.sum())
        # Attention weights are softmaxes in [0, 1]: a few ulps of 1.
        np.testing.assert_allclose(alphas[image, :len(emitted)],
                                   outputs["alphas"][image, :len(emitted)], rtol=0,
                                   atol=64 * np.finfo(np.float32).eps)
        assert not np.any(alphas[image, len(emitted):])


def _products(jaxpr) -> list:
    """(lhs, rhs, dimension numbers, accumulation dtype) of every matrix product in a
    jaxpr, nested ones (inside scans, custom VJPs) included."""
    found = []
    for equation in jaxpr.eqns:
        if equation.primitive.name == "dot_general":
            lhs, rhs = equation.invars
            found.append((lhs, rhs, equation.params["dimension_numbers"],
                          equation.params["preferred_element_type"]))
        for param in equation.params.values():
            for inner in (param if isinstance(param, (list, tuple)) else [param]):
                inner = getattr(inner, "jaxpr", inner)
                if hasattr(inner, "eqns"):
                    found += _products(inner)
    return found


def _dot_operand_dtypes(jaxpr) -> list:
    """(lhs dtype, rhs dtype, accumulation dtype) of every matrix product in a jaxpr."""
    return [(lhs.aval.dtype, rhs.aval.dtype, accumulate)
            for lhs, rhs, _, accumulate in _products(jaxpr)]


@variants
def test_bfloat16_multiplies_in_bfloat16_and_keeps_float32_where_precision_matters(variant, rng):
    """Mixed precision: parameters, their gradients, the logits, the attention and the
    loss in float32; every product of the forward pass on bfloat16 operands
    accumulating in float32 (the form XLA's CPU runs on AVX-512 BF16/AMX kernels);
    an LSTM's cell state in float32."""
    model = Captioner(make_decoder(_config(variant), VOCAB, FEATURES, jnp.bfloat16))
    batch = _batch(rng)
    variables = _init(model, batch)
    assert {x.dtype for x in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
    tokens = jnp.asarray(batch["tokens"])
    outputs = jax.jit(model.apply)(variables, batch["features"], tokens)
    assert outputs["logits"].dtype == jnp.float32 and outputs["alphas"].dtype == jnp.float32
    products = _dot_operand_dtypes(
        jax.make_jaxpr(model.apply)(variables, batch["features"], tokens).jaxpr)
    assert products and all(p == (jnp.bfloat16, jnp.bfloat16, jnp.float32) for p in products), \
        products
    _, state = model.apply(variables, batch["features"], 9, method=Captioner.start)
    if variant in ("soft", "hard", "none", "adaptive"):
        assert state[1].dtype == jnp.float32 and state[0].dtype == jnp.bfloat16  # (h, c)
    params = {"params": variables["params"]}
    rest = {k: v for k, v in variables.items() if k != "params"}

    def loss(params):
        return _loss(model, {**params, **rest}, batch, train=True,
                     rng=jax.random.PRNGKey(1))[0]

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    assert value.dtype == jnp.float32 and np.isfinite(float(value))
    assert {g.dtype for g in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}
    reference = _loss(_model(variant), variables, batch)[0]
    assert abs(float(_loss(model, variables, batch)[0]) - float(reference)) < 0.05 * abs(
        float(reference))


def test_soft_fast_path_equals_the_generic_path_in_loss_and_every_gradient(rng):
    """The hand-written backward against autodiff of the scanned step, with dropout on and
    a cotangent on the attention weights too; for the parameters and the features (whose
    gradient fine-tuning the encoder needs)."""
    fast, generic = _model("soft", dropout=0.3), _model("soft", dropout=0.3, fast_path=False)
    batch = _batch(rng)
    variables = _init(fast, batch)
    inputs, targets = batch["tokens"][:, :-1], batch["tokens"][:, 1:]
    mask = (targets != 0).astype(jnp.float32)

    def loss(model, params, features):
        outputs = model.apply({"params": params}, features, inputs, train=True,
                              rngs={"dropout": jax.random.PRNGKey(5)})
        ce = optax.softmax_cross_entropy_with_integer_labels(outputs["logits"], targets)
        mass = jnp.einsum("btp,bt->bp", outputs["alphas"], mask)
        return jnp.sum(ce * mask) / mask.sum() + jnp.sum(jnp.sin(3 * mass))

    args = (variables["params"], batch["features"])
    value, ours = jax.value_and_grad(lambda *a: loss(fast, *a), argnums=(0, 1))(*args)
    reference_value, reference = jax.value_and_grad(lambda *a: loss(generic, *a),
                                                    argnums=(0, 1))(*args)
    np.testing.assert_allclose(value, reference_value, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(  # float32 rounding, to scale
        a, b, rtol=2e-5, atol=1e-6 * float(np.abs(b).max())), ours, reference)


def test_soft_fast_path_in_bfloat16_multiplies_backwards_in_bfloat16_too(rng):
    """In bfloat16 the hand-written backward's large products (the loop's two, the two
    weight gradients after it) take bfloat16 operands in the plain ``x @ w`` form and
    accumulate in float32, and its gradients are as close to float32's as autodiff's."""
    batch = _batch(rng)
    fast = Captioner(make_decoder(_config("soft"), VOCAB, FEATURES, jnp.bfloat16))
    generic = Captioner(make_decoder(_config("soft", fast_path=False), VOCAB, FEATURES,
                                     jnp.bfloat16))
    variables = _init(_model("soft"), batch)

    def gradient(model):
        return jax.grad(lambda params: _loss(model, {"params": params}, batch)[0])

    reference = gradient(_model("soft"))(variables["params"])

    def error(model):  # per parameter, relative to float32's gradient
        return jax.tree.map(lambda g, r: float(jnp.linalg.norm(g - r) / jnp.linalg.norm(r)),
                            gradient(model)(variables["params"]), reference)

    ours, autodiff = error(fast), error(generic)
    jax.tree.map(lambda a, b: np.testing.assert_array_less(a, 1.25 * b + 2e-3), ours, autodiff)

    plain = {(tuple(lhs.aval.shape), tuple(rhs.aval.shape))
             for lhs, rhs, dims, accumulate in _products(
                 jax.make_jaxpr(gradient(fast))(variables["params"]).jaxpr)
             if lhs.aval.dtype == rhs.aval.dtype == jnp.bfloat16
             and accumulate == jnp.float32 and dims == (((1,), (0,)), ((), ()))}
    steps_rows = batch["tokens"].shape[0] * (batch["tokens"].shape[1] - 1)
    fused = 10 + FEATURES + 4 * 16  # attention query, f_beta gate, LSTM gates
    assert {((4, 64), (64, FEATURES)), ((4, fused), (fused, 16)),  # the loop's
            ((16, steps_rows), (steps_rows, fused)),  # weight gradients after it
            ((FEATURES, steps_rows), (steps_rows, 64))} <= plain


# ------------------------------------------------------------- hard attention


def test_hard_attention_gradient_is_unbiased_against_every_region_choice_enumerated():
    """Two steps over three regions: nine region paths. The exact gradient of the
    expected cross-entropy is their probability-weighted sum; the trainer's loss
    (cross-entropy of sampled regions + REINFORCE with a baseline) averaged over many
    samples must approach it, and cross-entropy alone must not."""
    regions, steps = 3, 2
    config = _config("hard", expected_context_prob=0.0, entropy_weight=0.0)
    model = Captioner(make_decoder(config, VOCAB, FEATURES))
    rng = np.random.default_rng(1)
    features = rng.normal(size=(1, 1, regions, FEATURES)).astype(np.float32)
    tokens = np.asarray([[1, 7, 2]], np.int32)  # <start> w <end>: two steps
    variables = model.init(jax.random.PRNGKey(0), features, tokens[:, :-1])

    plans = np.asarray(list(itertools.product(range(regions), repeat=steps)), np.int32)

    def expected_loss(params):
        # Every path of regions replayed (the step's given ``choice``), weighted by its
        # probability.
        decoder = model.decoder.bind({"params": params["decoder"], **{
            k: v["decoder"] for k, v in variables.items() if k != "params"}})
        context, state = decoder.start(np.repeat(features, len(plans), 0), steps)
        token_logp, path_logp = 0.0, 0.0
        for t in range(steps):
            word = decoder.embed(jnp.full(len(plans), tokens[0, t]))
            state, out = decoder.step(context, state, word, train=False, choice=plans[:, t])
            logp = jax.nn.log_softmax(decoder.logits(out["hidden"], False))
            token_logp += logp[:, tokens[0, t + 1]]
            path_logp += out["choice_logp"]
        return -jnp.sum(jnp.exp(path_logp) * token_logp) / steps

    exact = jax.grad(expected_loss)(variables["params"])
    baseline = float(-expected_loss(variables["params"]) * steps)  # any constant is unbiased
    samples = 20000
    batch = {"features": np.repeat(features, samples, 0), "tokens": np.repeat(tokens, samples, 0),
             "weights": np.ones(samples, np.float32)}
    stats = {"batch_stats": {"decoder": {"reward_baseline": jnp.asarray([baseline, 1.0])}}}

    def trainer_loss(params, with_reinforce=True):
        terms, counts, _ = loss_terms(model, {**stats, "params": params}, batch, 0.0, True,
                                      jax.random.PRNGKey(7))
        names = ["ce", "reinforce"] if with_reinforce else ["ce"]
        return sum(terms[n][0] / counts[terms[n][1]] for n in names)

    def distance(grads, part=lambda g: g):
        flat = lambda g: jnp.concatenate([x.ravel() for x in jax.tree.leaves(part(g))])  # noqa
        return float(jnp.linalg.norm(flat(grads) - flat(exact)) / jnp.linalg.norm(flat(exact)))

    attention = lambda g: g["decoder"]["attention"]  # noqa: E731  (reached by REINFORCE alone)
    estimated = jax.jit(jax.grad(trainer_loss))(variables["params"])
    cross_entropy_only = jax.jit(jax.grad(lambda p: trainer_loss(p, False)))(variables["params"])
    assert distance(estimated) < 0.01
    # 20000 samples: about 3% off (1% at 300000, where float32 sums set the floor)
    assert distance(estimated, attention) < 0.08
    assert distance(cross_entropy_only, attention) == pytest.approx(1.0)  # no gradient at all


def test_hard_attention_keeps_a_moving_average_baseline(rng):
    model, batch = _model("hard"), _batch(rng)
    variables = _init(model, batch)
    assert np.all(variables["batch_stats"]["decoder"]["reward_baseline"] == 0)
    _, batch_stats = _loss(model, variables, batch, True, jax.random.PRNGKey(0))
    average, accumulated = batch_stats["decoder"]["reward_baseline"]
    assert accumulated == pytest.approx(0.1) and average < 0  # 0.1 x a mean log-likelihood
    _, unchanged = _loss(model, variables, batch, False)
    assert unchanged is None


# --------------------------------------------------------------------- registry


def test_unknown_variants_and_settings_are_refused():
    config = _config("soft")
    config.variant = "lstm"
    with pytest.raises(ValueError, match="unknown decoder variant 'lstm'; known: none, soft"):
        make_decoder(config, VOCAB, FEATURES)
    config = _config("transformer")
    config.transformer.depth = 3
    with pytest.raises(ValueError, match="decoder.transformer has no setting depth"):
        make_decoder(config, VOCAB, FEATURES)


@pytest.mark.parametrize("variant, setting, message", [
    ("soft", {"hidden_dim": 0}, "decoder.hidden_dim=0: must be at least 1"),
    ("updown", {"dropout": 1.0}, "decoder.dropout=1.0: must be at least 0 and below 1"),
    ("adaptive", {"attention_dim": -2}, "decoder.attention_dim=-2: must be at least 1"),
    ("soft", {"alpha_c": -1.0}, "decoder.alpha_c=-1.0: must be at least 0"),
    ("hard", {"hard.baseline_decay": 1.0},
     "decoder.hard.baseline_decay=1.0: must be at least 0 and below 1"),
    ("hard", {"hard.expected_context_prob": 1.5},
     "decoder.hard.expected_context_prob=1.5: must be at least 0 and at most 1"),
    ("transformer", {"transformer.heads": 0}, "decoder.transformer.heads=0: must be at least 1"),
    ("transformer", {"transformer.heads": 3},
     r"decoder.transformer.width=16: must be a multiple of decoder.transformer.heads \(3\)"),
    # Heads divide it, but the 2-D positions of the regions need a sine and a cosine per axis
    # (it had crashed at init, after config.json was written).
    ("transformer", {"transformer.width": 18, "transformer.heads": 2},
     "decoder.transformer.width=18: must be a multiple of 4"),
])
def test_settings_out_of_range_are_refused_by_their_config_keys(variant, setting, message):
    config = _config(variant)
    for key, value in setting.items():
        section, _, field = key.rpartition(".")
        (config[section] if section else config)[field] = value
    with pytest.raises(ValueError, match=message):
        make_decoder(config, VOCAB, FEATURES)


def test_a_decoder_made_directly_checks_its_settings_when_initialised():
    # Not through make_decoder: the same rules, by field name, when setup runs.
    decoder = VARIANTS["transformer"](vocab_size=VOCAB, feature_dim=FEATURES, embed_dim=6,
                                      width=16, heads=3, mlp_dim=24)
    grid, tokens = jnp.zeros((1, GRID, GRID, FEATURES)), jnp.zeros((1, 5), jnp.int32)
    with pytest.raises(ValueError, match=r"^width=16: must be a multiple of heads \(3\)"):
        decoder.init(jax.random.PRNGKey(0), grid, tokens)
