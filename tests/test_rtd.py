"""Replaced-token detection (ELECTRA, minilm/objectives/rtd.py): labels, shared embeddings, the
gradient paths, the loss weighting, the masking shares, the sampling law and its reproducibility,
learning, gradient accumulation, --init_from, and sample.py --score."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from minilm.config import ModelConfig, ObjectiveConfig, TrainConfig
from minilm.errors import UserError
from minilm.objectives import build_objective, finalize, train_defaults_for
from minilm.objectives import rtd as rtd_module
from minilm.objectives.rtd import sample_from_logits
from minilm.tokenizer import MASK_ID, NUM_SPECIAL, PAD_ID
from minilm.trainer import build_optimizer
from tests.conftest import load_script, run_in_process

pytestmark = pytest.mark.usefixtures("one_thread")

V = NUM_SPECIAL + 64   # 64 ordinary ids after the specials
CFG = ModelConfig(vocab_size=V, seq_len=16, n_layer=2, n_head=4, n_embd=32)


def make(cfg=CFG, **options):
    torch.manual_seed(0)
    return build_objective("rtd", cfg, None, ObjectiveConfig(**options))


def raw_batch(B=4, T=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(NUM_SPECIAL, V, (B, T + 1), generator=g)


def seeded(seed):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- labels
def test_labels_on_hand_built_cases():
    """Replaced iff the sample differs from the original: a sample equal to the original counts as
    original; positions not chosen keep their token and are original."""
    objective = make()
    ids = torch.tensor([[10, 11, 12, 13], [14, 15, PAD_ID, PAD_ID]])
    batch = {"input_ids": ids, "positions": torch.tensor([1, 2, 4])}       # (0, 1), (0, 2), (1, 0)
    corrupted, replaced = objective.corrupt(batch, torch.tensor([11, 40, 41]))   # 11 == original
    assert corrupted.tolist() == [[10, 11, 40, 13], [41, 15, PAD_ID, PAD_ID]]
    assert replaced.tolist() == [[False, False, True, False], [True, False, False, False]]


def test_pads_are_never_chosen_nor_labelled_and_every_changed_token_is_replaced(monkeypatch):
    objective = make(mask_prob=1.0)
    # every sample differs from its original: each chosen token is a replacement
    monkeypatch.setattr(rtd_module, "sample_from_logits", lambda logits, noise, t: torch.full_like(logits[:, 0], 150, dtype=torch.long))
    raw = raw_batch(2, 16)
    raw[:, 5] = 150                                  # a sample equal to the original: original
    lengths = torch.tensor([16, 9])
    batch = objective.make_batch(raw, seeded(0), lengths=lengths)
    chosen = torch.zeros(2 * 16, dtype=torch.bool)
    chosen[batch["positions"]] = True
    assert not chosen.view(2, 16)[1, 9:].any()       # no pad chosen
    assert batch["valid"].sum() == 25 and batch["counts"]["tokens"] == 25
    _, sums = objective(batch)
    assert sums["discriminator/targets"] == 25                      # pads not labelled
    with torch.no_grad():   # nor in the loss: its sum runs over the 25 real tokens only
        corrupted, replaced = objective.corrupt(batch, torch.full_like(batch["targets"], 150))
        detector = objective.discriminator_logits(corrupted, batch["attn_mask"])
    valid = batch["valid"]
    by_hand = F.binary_cross_entropy_with_logits(detector[valid], replaced[valid].float(), reduction="sum")
    torch.testing.assert_close(sums["discriminator/nll"], by_hand)
    assert sums["discriminator/positives"] == 25 - 2                # all but the two 150s
    assert sums["generator/targets"] == 25


# ----------------------------------------------------------------------------- shared embeddings
def test_embeddings_are_the_same_parameters_and_in_the_optimizer_once():
    cfg = dataclasses.replace(CFG, position="learned", n_segment=2)
    objective = make(cfg)
    gen, disc = objective.generator, objective.backbone
    for table in ("tok_emb", "pos_emb", "seg_emb", "embed_norm"):
        assert getattr(gen, table).weight is getattr(disc, table).weight, table
    assert gen.cfg.n_embd == 8 and gen.cfg.n_head == 1 and gen.cfg.head_dim == disc.cfg.head_dim
    assert gen.embed_project.weight.shape == (8, 32)
    optimizer = build_optimizer(objective, TrainConfig(), torch.device("cpu"))
    in_groups = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert len(in_groups) == len(set(in_groups)) == len({id(p) for p in objective.parameters()})
    assert in_groups.count(id(disc.tok_emb.weight)) == 1
    names = [name for name, p in objective.named_parameters() if p is disc.tok_emb.weight]
    assert names == ["backbone.tok_emb.weight"]


@pytest.mark.parametrize("name", ["rtd+plm", "mlm+rtd"])
def test_in_a_combination_the_generator_reads_the_shared_backbones_tables(name):
    """a+b shares the first part's backbone; rtd's generator must read that one's tables (as its
    head already multiplied by its token table), not the backbone rtd built and a+b dropped."""
    objective = build_objective(name, dataclasses.replace(CFG, position="learned"))
    generator, backbone = objective.parts["rtd"].generator, objective.backbone
    for table in ("tok_emb", "pos_emb", "embed_norm"):
        assert getattr(generator, table).weight is getattr(backbone, table).weight, table
    with pytest.raises(UserError, match="--embedding_sharing gdes is for --objective rtd alone"):
        build_objective(name, CFG, None, ObjectiveConfig(embedding_sharing="gdes"))


def test_a_generator_as_wide_as_the_discriminator_reads_the_embeddings_directly():
    objective = make(generator_fraction=1.0)
    assert objective.generator.embed_project is None and objective.generator.cfg.n_embd == 32


def split_losses(objective, batch):
    """(generator loss, discriminator loss) of one batch, each its own graph."""
    logits = objective.generator_logits(batch)
    generator_loss = F.cross_entropy(logits, batch["targets"])
    corrupted, replaced = objective.corrupt(batch, sample_from_logits(logits.detach(), batch["sample_noise"]))
    detector = objective.discriminator_logits(corrupted)
    return generator_loss, F.binary_cross_entropy_with_logits(detector, replaced.float())


@pytest.mark.parametrize("sharing", ["electra", "none", "gdes"])
def test_which_token_table_each_loss_trains(sharing):
    """electra: one table, both losses train it. none: a table each, each loss trains its own.
    gdes: the discriminator reads the generator's table without its gradient plus a zero-initialised
    residual; the generator's loss trains only the generator's table, the discriminator's only the
    residual."""
    objective = make(embedding_sharing=sharing)
    generator_table = objective.generator.tok_emb.weight
    tables = {"generator": generator_table}
    if sharing == "none":
        tables["discriminator"] = objective.backbone.tok_emb.weight
    if sharing == "gdes":
        tables["residual"] = objective.backbone.tok_emb.delta
        assert not objective.backbone.tok_emb.delta.any()
        assert torch.equal(objective.backbone.tok_emb.weight, generator_table)   # reads the generator's
    assert (generator_table is objective.backbone.tok_emb.weight) == (sharing == "electra")
    names = [name for name, _ in objective.named_parameters()]
    assert len(names) == len(set(names)) and sum("tok_emb" in name for name in names) == len(tables)
    generator_loss, discriminator_loss = split_losses(objective, objective.make_batch(raw_batch(), seeded(1)))
    trained = {}
    for loss_name, loss in (("generator", generator_loss), ("discriminator", discriminator_loss)):
        grads = torch.autograd.grad(loss, list(tables.values()), allow_unused=True, retain_graph=True)
        trained[loss_name] = {name for name, g in zip(tables, grads) if g is not None and g.any()}
    expected = {"electra": {"generator": {"generator"}, "discriminator": {"generator"}},
                "none": {"generator": {"generator"}, "discriminator": {"discriminator"}},
                "gdes": {"generator": {"generator"}, "discriminator": {"residual"}}}[sharing]
    assert trained == expected


def test_a_gdes_checkpoint_holds_the_table_the_discriminator_reads():
    """Its backbone's "tok_emb.weight" is generator table + residual, which fine-tuning
    (--init_from) takes; loading the state back (--resume) restores both parts."""
    objective = make(embedding_sharing="gdes")
    with torch.no_grad():
        objective.backbone.tok_emb.delta.normal_()
    state = objective.state_dict()
    merged = objective.generator.tok_emb.weight + objective.backbone.tok_emb.delta
    assert torch.equal(state["backbone.tok_emb.weight"], merged.detach())
    child = build_objective("classify", CFG, None, ObjectiveConfig(labels='["a", "b"]'))
    train_script = load_script("train.py")
    from minilm.config import Config
    parent_cfg = Config(model=CFG)
    parent_cfg.train.objective, parent_cfg.obj.embedding_sharing = "rtd", "gdes"
    train_script.load_parent_weights(child, {"model": state, "config": parent_cfg.to_dict(), "objective": "rtd"},
                                     "parent.pt", log=lambda *_: None)
    assert torch.equal(child.backbone.tok_emb.weight, merged.detach())
    again = make(embedding_sharing="gdes")
    again.load_state_dict(state)
    assert torch.equal(again.backbone.tok_emb.weight, merged.detach())
    probe = raw_batch()[:, :16]
    torch.testing.assert_close(again.replaced_probabilities(probe), objective.replaced_probabilities(probe))


# ----------------------------------------------------------------------------- gradients and loss
def generator_only_parameters(objective):
    shared = {id(p) for p in objective.backbone.parameters()}
    return [p for p in list(objective.generator.parameters()) + list(objective.generator_head.parameters())
            if id(p) not in shared]


def test_no_gradient_reaches_the_generator_from_the_discriminator_loss():
    objective = make()
    batch = objective.make_batch(raw_batch(), seeded(1))
    loss, _ = objective(batch)
    count = batch["counts"]["targets"]
    generator_loss = F.cross_entropy(objective.generator_logits(batch), batch["targets"], reduction="sum") / count
    discriminator_part = loss - generator_loss
    gradients = torch.autograd.grad(discriminator_part, generator_only_parameters(objective), allow_unused=True,
                                    retain_graph=True)
    # zero up to rounding: the generator loss is subtracted, not absent (a leak would be ~1e-3)
    assert all(g is None or g.abs().max() < 1e-9 for g in gradients)
    # ... while the whole loss does train the generator, and the discriminator part the discriminator
    assert any(g is not None and g.any() for g in torch.autograd.grad(loss, generator_only_parameters(objective),
                                                                      allow_unused=True, retain_graph=True))
    head = torch.autograd.grad(discriminator_part, objective.discriminator_head.out.weight)[0]
    assert head.abs().sum() > 0


def test_the_loss_is_generator_mean_plus_weight_times_discriminator_mean(monkeypatch):
    objective = make(rtd_weight=7.0)
    batch = objective.make_batch(raw_batch(), seeded(2))
    totals = {"targets": batch["counts"]["targets"] * 2, "tokens": batch["counts"]["tokens"] * 3}
    with torch.no_grad():
        loss, sums = objective(batch)
        loss_with_totals, _ = objective(batch, totals)
        logits = objective.generator_logits(batch)
        sampled = sample_from_logits(logits, batch["sample_noise"])
        corrupted, replaced = objective.corrupt(batch, sampled)
        detector = objective.discriminator_logits(corrupted)
    generator_sum = F.cross_entropy(logits, batch["targets"], reduction="sum")
    discriminator_sum = F.binary_cross_entropy_with_logits(detector, replaced.float(), reduction="sum")
    n, tokens = batch["counts"]["targets"], batch["counts"]["tokens"]
    assert tokens == 4 * 16
    torch.testing.assert_close(loss, generator_sum / n + 7.0 * discriminator_sum / tokens)
    torch.testing.assert_close(loss_with_totals, generator_sum / (2 * n) + 7.0 * discriminator_sum / (3 * tokens))
    metrics = finalize({k: float(v) for k, v in sums.items()}, objective)   # rtd's metrics(): positive_share
    assert metrics["loss"] == pytest.approx(float(loss), rel=1e-5)
    assert metrics["discriminator/positive_share"] == pytest.approx(float(replaced.sum()) / tokens)


# ----------------------------------------------------------------------------- masking and sampling
@pytest.mark.parametrize("replacement, masked, random", [("electra", 0.85, 0.0), ("bert", 0.8, 0.1)])
def test_replacement_shares(replacement, masked, random):
    objective = make(rtd_replacement=replacement)
    g = torch.Generator().manual_seed(3)
    raw = torch.randint(NUM_SPECIAL, V, (256, 17), generator=g)
    raw[:, ::7] = 3                                   # specials (<eos>) are never chosen
    batches = [objective.make_batch(raw, seeded(s)) for s in range(10)]
    chosen = torch.cat([torch.zeros(256 * 16, dtype=torch.bool).index_fill_(0, b["positions"], True) for b in batches])
    ids = torch.cat([b["input_ids"].flatten() for b in batches])
    shown = torch.cat([b["masked_ids"].flatten() for b in batches])
    eligible = ids != 3
    assert not chosen[~eligible].any()
    assert chosen.sum() / eligible.sum() == pytest.approx(0.15, abs=0.005)
    n = chosen.sum()
    assert (shown[chosen] == MASK_ID).sum() / n == pytest.approx(masked, abs=0.01)
    # a random replacement can draw the original itself (1 in 64 here); count what changed
    assert ((shown[chosen] != MASK_ID) & (shown[chosen] != ids[chosen])).sum() / n == pytest.approx(
        random * (1 - 1 / (V - NUM_SPECIAL)), abs=0.01)
    assert torch.equal(shown[~chosen], ids[~chosen])


def test_the_batch_and_its_samples_come_from_the_generator_alone():
    objective = make()
    first, second = (objective.make_batch(raw_batch(), seeded(7)) for _ in range(2))
    for key in ("masked_ids", "positions", "sample_noise"):
        assert torch.equal(first[key], second[key]), key
    other = objective.make_batch(raw_batch(), seeded(8))
    assert not torch.equal(first["sample_noise"][:5], other["sample_noise"][:5])
    torch.manual_seed(123)   # the forward draws nothing: the global state does not matter
    _, sums_a = objective(first)
    torch.manual_seed(456)
    _, sums_b = objective(second)
    assert all(torch.equal(sums_a[k], sums_b[k]) for k in sums_a)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_samples_follow_the_softmax(temperature):
    logits = torch.tensor([2.0, 0.0, -1.0, 1.0, -30.0, 0.5])
    n = 40000
    noise = torch.rand(n, generator=seeded(11))
    sampled = sample_from_logits(logits.expand(n, -1), noise, temperature)
    counts = torch.bincount(sampled, minlength=6).double()
    expected = torch.softmax(logits.double() / temperature, dim=0) * n
    assert counts[4] <= 2                                          # probability ~1e-14 (T=1)
    keep = expected > 5
    chi_square = float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    assert chi_square < 20.5, chi_square        # 0.1% critical value with 4 degrees of freedom: 18.5


# ----------------------------------------------------------------------------- accumulation
def test_two_micro_batches_give_the_gradient_of_one_big_batch():
    objective = make()
    micro = [objective.make_batch(raw_batch(seed=s), seeded(20 + s)) for s in range(2)]
    totals = {k: sum(b["counts"][k] for b in micro) for k in micro[0]["counts"]}
    for b in micro:
        objective(b, totals)[0].backward()
    accumulated = [p.grad.clone() for p in objective.parameters()]
    objective.zero_grad()
    B, T = micro[0]["input_ids"].shape
    big = {key: torch.cat([micro[0][key], micro[1][key]]) for key in
           ("input_ids", "masked_ids", "targets", "valid", "sample_noise")}
    big["positions"] = torch.cat([micro[0]["positions"], micro[1]["positions"] + B * T])
    big["counts"] = totals
    objective(big)[0].backward()
    for p, g in zip(objective.parameters(), accumulated):
        torch.testing.assert_close(p.grad, g, atol=1e-6, rtol=1e-4)


# ----------------------------------------------------------------------------- learning
def test_a_tiny_discriminator_beats_the_all_original_baseline():
    """Each row repeats one random token: a replaced token is the odd one out, which the
    discriminator learns to see (by attending to the rest of the row) while the generator, which
    must guess the row's token from a row of <mask>s and copies, is still far from perfect."""
    torch.manual_seed(0)
    objective = make()
    optimizer = torch.optim.AdamW(objective.parameters(), lr=3e-3)

    def constant_rows(seed, B=16):
        return torch.randint(NUM_SPECIAL, V, (B, 1), generator=seeded(seed)).expand(B, 17).clone()

    for step in range(150):
        loss, _ = objective(objective.make_batch(constant_rows(step), seeded(step)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    objective.eval()
    sums = {}
    with torch.no_grad():
        for i in range(8):
            for k, v in objective(objective.make_batch(constant_rows(1000 + i), seeded(1000 + i)))[1].items():
                sums[k] = sums.get(k, 0) + float(v)
    metrics = finalize(sums, objective)   # precision and recall: rtd's metrics()
    baseline = 1 - metrics["discriminator/positive_share"]
    assert metrics["discriminator/positive_share"] > 0.03, metrics      # there is something to detect
    assert metrics["discriminator/acc"] > baseline + 0.5 * (1 - baseline), metrics
    assert metrics["discriminator/recall"] > 0.5 and metrics["discriminator/precision"] > 0.5, metrics


def test_rtd_defaults_its_own_learning_rate_and_a_flag_wins():
    """ELECTRA-Small's lr 5e-4 (min 5e-5), declared in rtd.py (train_defaults), where a command line
    leaves --lr and --min_lr out; the other objectives keep TrainConfig's."""
    base = TrainConfig()
    chosen = train_defaults_for("rtd", base, set())
    assert (chosen.lr, chosen.min_lr) == (5e-4, 5e-5)
    assert train_defaults_for("mlm+rtd", base, set()).lr == 5e-4
    assert train_defaults_for("rtd", dataclasses.replace(base, lr=1e-3), {"lr"}).lr == 1e-3   # --lr 1e-3 given
    assert train_defaults_for("mlm", base, set()).lr == base.lr
    with pytest.raises(UserError, match="--min_lr"):   # --min_lr 1e-3 alone: above rtd's lr
        train_defaults_for("rtd", dataclasses.replace(base, min_lr=1e-3), {"min_lr"})


# ----------------------------------------------------------------------------- --init_from, --score
def test_init_from_an_rtd_checkpoint_takes_the_discriminator():
    train_script = load_script("train.py")
    from minilm.config import Config
    parent = make()
    with torch.no_grad():   # every tensor unlike a fresh one, so whatever is taken shows
        for p in parent.parameters():
            p.add_(torch.randn_like(p))
    parent_cfg = Config(model=CFG)
    parent_cfg.train.objective = "rtd"
    state = {"model": parent.state_dict(), "config": parent_cfg.to_dict(), "objective": "rtd", "step": 5}
    torch.manual_seed(1)
    child = build_objective("mlm", CFG)
    head_before = {k: v.clone() for k, v in child.head.state_dict().items()}
    train_script.load_parent_weights(child, state, "parent.pt", log=lambda *_: None)
    for key, value in parent.backbone.state_dict().items():
        assert torch.equal(child.backbone.state_dict()[key], value), key
    for key, value in child.head.state_dict().items():    # not the generator's head
        assert torch.equal(value, head_before[key]), key


@pytest.fixture(scope="module")
def rtd_checkpoint(tmp_path_factory, corpus_dir):
    from tests.test_cli import TINY
    out = tmp_path_factory.mktemp("rtd")
    result = run_in_process("train.py", "--data", corpus_dir, "--out_dir", out, "--objective", "rtd",
                            "--max_steps", 2, "--eval_every", 2, *TINY)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "discriminator/acc" in result.stdout + result.stderr
    return out


def test_train_py_saves_rtds_own_learning_rate(rtd_checkpoint):
    from minilm.checkpoint import list_checkpoints
    state = torch.load(list_checkpoints(str(rtd_checkpoint))[-1], weights_only=True)
    assert (state["config"]["train"]["lr"], state["config"]["train"]["min_lr"]) == (5e-4, 5e-5)


def test_score_prints_each_tokens_replaced_probability(rtd_checkpoint):
    sample_script = load_script("sample.py")
    text = "The cat sat on the mat."
    result = run_in_process("sample.py", "--ckpt", rtd_checkpoint, "--score", text, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    objective, tokenizer, _ = sample_script.load_for_inference(str(rtd_checkpoint), torch.device("cpu"))
    ids = tokenizer.encode(text)
    expected = objective.replaced_probabilities(torch.tensor([[3] + ids]))[0, 1:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == len(ids)
    for line, token, probability in zip(lines, ids, expected.tolist()):
        shown, piece = line.split("  ", 1)
        assert float(shown) == pytest.approx(probability, abs=1e-4)
        assert piece == '"' + tokenizer.id_to_piece(token) + '"'


def test_an_rtd_checkpoint_without_score_names_the_flag(rtd_checkpoint):
    from tests.test_cli import assert_user_error
    result = run_in_process("sample.py", "--ckpt", rtd_checkpoint, "--prompt", "The", "--device", "cpu")
    assert_user_error(result, "replaced-token detector", "--score")


@pytest.mark.parametrize("kind, name, fills_masks, fragment", [
    ("encoder", "mlm", True, "--fill"), ("decoder", "clm", False, "--prompt"), ("seq2seq", "t5", False, "--infill")])
def test_score_on_another_checkpoint_names_the_flag_that_fits(kind, name, fills_masks, fragment):
    from minilm.objectives import objective_class
    sample_script = load_script("sample.py")
    args = dict(sample_script.DEFAULTS, score="The cat")
    declared = objective_class(name)   # what the checkpoint can do is what its objective declares
    assert declared.model_kind == kind and ("fill" in declared.capabilities) == fills_masks
    with pytest.raises(UserError, match=f"--score needs a replaced-token detection checkpoint .*{fragment}"):
        sample_script.check_flags_fit(args, declared, "out")


def test_score_with_fill_is_refused():
    sample_script = load_script("sample.py")
    with pytest.raises(UserError, match=r"--fill \(masked LMs\) and --score \(replaced-token detectors\) exclude"):
        sample_script.main(["--fill", "a <mask>", "--score", "a", "--ckpt", "none.pt"])
