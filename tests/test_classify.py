"""--objective classify (minilm/objectives/classify.py, minilm/data/labelled.py): a fine-tuned head
learns a learnable task, --init_from really loads mlm's, rtd's and t5's backbones and refuses a
model that does not fit, the label mapping survives save and load, acc and macro-F1 are the
hand-computed ones, evaluation visits every validation row once, --freeze_backbone freezes, and
bad input is one line."""
from __future__ import annotations

import json
import os
import random

import pytest
import torch

from minilm.objectives import finalize
from minilm.objectives.classify import options_for_parent
from minilm.provenance import parent_config
from tests.conftest import load_script, run_in_process
from tests.test_cli import TINY, assert_user_error

pytestmark = pytest.mark.usefixtures("peak_flops_once")

TOPICS = {"sport": "ball goal team match player score coach field win run".split(),
          "food": "bread cheese apple soup salad cook taste dinner sugar rice".split(),
          "space": "star planet orbit rocket moon galaxy comet launch sky sun".split()}
COMMON = "the a of and to in is it was very with for on that this".split()
# the labelled runs: TINY's shape, eval once at the end over the whole validation file
FLAGS = [*TINY, "--batch_size", "16", "--lr", "3e-3", "--warmup_steps", "5"]


def write_labelled(path, n_rows: int, seed: int) -> str:
    """Rows of 3 topic words among 5 common ones, labelled by the topic: clearly learnable,
    classes balanced (in turn), so the majority class is right a third of the time."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        f.write("text\tlabel\n")
        for i in range(n_rows):
            label = list(TOPICS)[i % 3]
            words = [rng.choice(TOPICS[label]) for _ in range(3)] + [rng.choice(COMMON) for _ in range(5)]
            rng.shuffle(words)
            f.write(" ".join(words) + f"\t{label}\n")
    return str(path)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    folder = tmp_path_factory.mktemp("labelled")
    return write_labelled(folder / "train.tsv", 240, 0), write_labelled(folder / "val.tsv", 31, 1)


@pytest.fixture(scope="module")
def fine_tuned(tmp_path_factory, labelled):
    out = tmp_path_factory.mktemp("classify")
    result = run_in_process("train.py", "--objective", "classify", "--data", labelled[0], "--val_data", labelled[1],
                            "--out_dir", out, "--max_steps", 60, "--eval_every", 30, "--log_every", 10, *FLAGS)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return str(out), result.stdout


@pytest.fixture(scope="module")
def parents(tmp_path_factory, corpus_dir):
    """Tiny pretraining runs (3 steps) of mlm, rtd and t5: their checkpoints are --init_from's parents."""
    out = {}
    for objective in ("mlm", "rtd", "t5"):
        folder = tmp_path_factory.mktemp(f"parent-{objective}")
        result = run_in_process("train.py", "--objective", objective, "--data", corpus_dir, "--out_dir", folder,
                                "--max_steps", 3, *TINY)
        assert result.returncode == 0, result.stderr[-3000:]
        out[objective] = str(folder / "ckpt-00000003.pt")
    return out


def test_fine_tuned_head_beats_the_majority_class(fine_tuned):
    out, stdout = fine_tuned
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    evals = [r for r in records if "val_acc" in r]
    assert [r["step"] for r in evals] == [30, 60]
    majority = 11 / 31                       # the largest class of the 31 validation rows
    assert evals[-1]["val_acc"] >= majority + 0.4, evals
    assert evals[-1]["val_macro_f1"] >= 0.7, evals
    # the confusion matrix at the end: one row per label, summing to the 31 validation rows
    lines = stdout.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("confusion matrix"))
    matrix = [[int(v) for v in line.split("|")[1].split()] for line in lines[at + 2:at + 5]]
    assert [line.split("|")[0].strip() for line in lines[at + 2:at + 5]] == ["food", "space", "sport"]
    assert sum(map(sum, matrix)) == 31 and sum(matrix[i][i] for i in range(3)) / 31 == pytest.approx(evals[-1]["val_acc"])
    assert any(line.startswith("done: val loss") and "macro-F1" in line for line in lines)
    assert os.path.exists(os.path.join(out, "best.pt"))


def test_label_mapping_survives_save_and_load(fine_tuned):
    import minilm
    out, _ = fine_tuned
    model = minilm.load(out, device="cpu")
    assert model.objective.label_names == ["food", "space", "sport"]
    assert model.config.obj.labels == '["food", "space", "sport"]'
    ranked = model.classify("rocket moon orbit of the star")
    assert [label for label, _ in ranked][0] == "space"
    assert sorted(label for label, _ in ranked) == ["food", "space", "sport"]
    assert sum(p for _, p in ranked) == pytest.approx(1.0)
    # a text's answer does not depend on the texts batched with it
    together = model.classify(["rocket moon orbit of the star", "bread and cheese and a very long dinner of soup"])
    assert [label for label, _ in together[0]] == [label for label, _ in ranked]
    assert [p for _, p in together[0]] == pytest.approx([p for _, p in ranked], abs=1e-5)
    best = minilm.load(os.path.join(out, "best.pt"), device="cpu")
    assert best.objective.label_names == ["food", "space", "sport"]
    # sample.py --classify: every label with its probability, best first, per text
    result = run_in_process("sample.py", "--ckpt", out, "--device", "cpu", "--classify", "goal for the team", "soup")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == '--- text 1: "goal for the team"' and lines[1].split()[1] == "sport"
    assert lines[4] == '--- text 2: "soup"' and len(lines) == 8


def test_a_classifier_refuses_other_methods_in_one_line(fine_tuned):
    import minilm
    from minilm.errors import UserError
    out, _ = fine_tuned
    model = minilm.load(out, device="cpu")
    with pytest.raises(UserError, match=r"embed\(\) needs an encoder .* holds a classifier \(classify\): use classify"):
        model.embed(["text"])
    assert_user_error(run_in_process("sample.py", "--ckpt", out, "--device", "cpu", "--prompt", "hi"),
                      "holds a classifier", "--classify")


def test_accuracy_and_macro_f1_are_the_hand_computed_ones():
    from minilm.config import ModelConfig, ObjectiveConfig
    from minilm.objectives import build_objective
    # rows: true label, columns: predicted; label 3 occurs nowhere, so it has no F1 and is left out
    confusion = torch.tensor([[5, 1, 0, 0], [2, 3, 1, 0], [0, 0, 4, 0], [0, 0, 0, 0]])
    classifier = build_objective("classify", ModelConfig(vocab_size=400, seq_len=8, n_layer=1, n_head=2, n_embd=16),
                                 None, ObjectiveConfig(labels='["a", "b", "c", "d"]'))
    metrics = finalize({"nll": torch.tensor(8.0), "targets": torch.tensor(16), "correct": torch.tensor(12),
                        "confusion": confusion}, classifier)   # macro_f1: the classifier's metrics()
    f1 = [2 * 5 / (2 * 5 + 1 + 2), 2 * 3 / (2 * 3 + 3 + 1), 2 * 4 / (2 * 4 + 1 + 0)]
    assert metrics["acc"] == 12 / 16
    assert metrics["macro_f1"] == pytest.approx(sum(f1) / 3, abs=1e-12)
    assert metrics["loss"] == 0.5 and "confusion" not in metrics


def test_evaluation_visits_every_validation_row_once(tmp_path, labelled, tokenizer):
    from minilm.config import Config
    from minilm.data import LabelledSource, prepare_rows
    from minilm.objectives import build_objective
    from minilm.trainer import Trainer
    data = str(tmp_path / "data")
    meta = prepare_rows(labelled[0], tokenizer, data, columns=[("text", "--text_field")], label_column="label",
                        val_source=labelled[1], num_workers=1, log=lambda _: None)
    cfg = Config()
    cfg.model.vocab_size, cfg.model.n_layer, cfg.model.n_embd, cfg.model.seq_len = tokenizer.vocab_size, 1, 32, 32
    cfg.train.device, cfg.train.out_dir, cfg.train.batch_size, cfg.train.eval_batches = "cpu", str(tmp_path), 4, 1
    cfg.obj.labels = json.dumps(meta["labels"])
    objective = build_objective("classify", cfg.model, tokenizer, cfg.obj)
    val = LabelledSource(data, "val", 32, 4)
    seen = []
    original = val.eval_batch

    def recording(i):
        batch = original(i)
        seen.extend(batch["rows"][batch["row_valid"]].tolist())
        return batch
    val.eval_batch = recording
    trainer = Trainer(cfg, objective, LabelledSource(data, "train", 32, 4), val, tokenizer, log=lambda *_: None)
    metrics = trainer.evaluate()
    assert sorted(seen) == list(range(31))           # 8 batches of 4, the last with one padding row
    assert int(trainer.last_eval_sums["confusion"].sum()) == 31 == int(trainer.last_eval_sums["targets"])
    assert metrics["acc"] == float(trainer.last_eval_sums["correct"]) / 31


def backbone_of(state: dict, prefix: str = "backbone.") -> dict:
    return {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}


@pytest.mark.parametrize("parent", ["mlm", "rtd", "t5"])
def test_init_from_loads_the_parents_backbone(parent, parents, labelled, tmp_path):
    """train.py's --init_from path in this process: the classifier's backbone holds exactly the
    parent's tensors (rtd: its discriminator; t5: its encoder stack and the shared token table)."""
    from minilm.checkpoint import load_checkpoint
    from minilm.objectives import build_objective
    train_script = load_script("train.py")
    state = load_checkpoint(parents[parent])
    argv = ["--objective", "classify", "--data", labelled[0], "--init_from", parents[parent], "--out_dir", str(tmp_path)]
    cfg = train_script.config_for_init(argv, state, parents[parent])
    cfg.obj = options_for_parent(cfg.obj, parent_config(state))
    cfg.obj.labels = '["food", "space", "sport"]'
    objective = build_objective("classify", cfg.model, None, cfg.obj)
    before = {k: v.clone() for k, v in objective.state_dict().items()}
    train_script.load_parent_weights(objective, state, parents[parent], log=lambda _: None)
    own = backbone_of(objective.state_dict())
    expected = backbone_of(state["model"], "backbone.encoder." if parent == "t5" else "backbone.")
    assert set(own) <= set(expected) and own
    for key, value in own.items():
        assert torch.equal(value, expected[key]), key
        assert not torch.equal(value, before["backbone." + key]) or value.dim() < 2, key   # it did change
    # none of these parents ever read [CLS]: auto pooling is the mean over the real tokens
    assert cfg.obj.classifier_attention == "bidirectional" and cfg.obj.pooling == "mean"


def test_auto_pooling_reads_first_only_where_pretraining_taught_the_first_position():
    from minilm.config import Config, ObjectiveConfig

    def resolved(parent_objective, **parent_options):
        parent = None
        if parent_objective is not None:
            cfg = Config()
            cfg.train.objective = parent_objective
            for key, value in parent_options.items():
                setattr(cfg.obj, key, value)
            parent = {"config": cfg.to_dict(), "objective": parent_objective}
        options = options_for_parent(ObjectiveConfig(), parent and parent_config(parent))
        return options.classifier_attention, options.pooling

    assert resolved(None) == ("bidirectional", "mean")               # from scratch: as after an encoder
    assert resolved("clm") == ("causal", "last")
    assert resolved("prefix_lm") == ("bidirectional", "mean")
    for never_saw_cls in ("mlm", "wwm", "span", "rtd", "plm", "t5", "tlm"):
        assert resolved(never_saw_cls) == ("bidirectional", "mean"), never_saw_cls
    assert resolved("mlm+sop") == ("bidirectional", "first")          # sop's head reads [CLS]
    assert resolved("simcse") == ("bidirectional", "first")
    assert resolved("simcse", simcse_pooling="mean") == ("bidirectional", "mean")
    assert resolved("classify", pooling="last", classifier_attention="causal") == ("causal", "last")
    assert resolved("classify", pooling="mean", classifier_attention="bidirectional") == ("bidirectional", "mean")
    explicit = options_for_parent(ObjectiveConfig(pooling="first"), parent_config({"config": Config().to_dict(),
                                                                                   "objective": "mlm"}))
    assert explicit.pooling == "first"                                  # a given --pooling is kept


def test_without_lr_a_pretrained_backbone_fine_tunes_at_1e3_its_objectives_own_or_3e4_from_scratch():
    """Without --lr a classifier on an --init_from parent fine-tunes at FINETUNE_LR, or at the
    parent objective's declared finetune_lr (t5 and ul2, which inherits it, simcse and simcse_sup: 3e-3; in a+b the
    first part that declares one), and one from random weights at SCRATCH_LR, each decaying to a
    tenth of it (the man-page task's best for each); --lr, and --min_lr, win."""
    from minilm.config import Config
    from minilm.objectives.classify import FINETUNE_LR, SCRATCH_LR, Classifier

    def finished(parent_objective, given=()):
        cfg = Config()
        cfg.train.lr, cfg.train.min_lr = 7e-3, 7e-4     # stand-ins for what the flags set
        parent = None
        if parent_objective is not None:
            parent = Config()
            parent.train.objective = parent_objective
        cfg = Classifier.finish_config(cfg, parent, set(given))
        return cfg.train.lr, cfg.train.min_lr

    assert (FINETUNE_LR, SCRATCH_LR) == (1e-3, 3e-4) and max(FINETUNE_LR, SCRATCH_LR) < Config().train.lr
    assert finished(None) == (SCRATCH_LR, pytest.approx(SCRATCH_LR / 10))
    for parent in ("mlm", "rtd", "plm", "mlm+sop", "classify"):
        assert finished(parent) == (FINETUNE_LR, pytest.approx(FINETUNE_LR / 10)), parent
    for parent in ("t5", "ul2", "simcse", "simcse_sup"):
        assert finished(parent) == (3e-3, pytest.approx(3e-4)), parent
    assert finished("mlm", given={"lr"}) == finished(None, given={"lr"}) == (7e-3, 7e-4)   # --lr: both kept
    assert finished("mlm", given={"min_lr"}) == (FINETUNE_LR, 7e-4)                        # --min_lr: kept


def test_a_scratch_classifier_is_the_fine_tuned_encoders_model_with_other_weights(parents, labelled, tmp_path):
    """classify from scratch (with the parent's tokenizer) builds the model a fine-tuned mlm backbone
    is: the same config (the embedding norm included), pooling, attention, tensor names and shapes."""
    from minilm.checkpoint import load_checkpoint
    flags = ["--objective", "classify", "--data", labelled[0], "--val_data", labelled[1], *FLAGS, "--max_steps", 5]
    tokenizer = os.path.join(os.path.dirname(parents["mlm"]), "tokenizer.model")
    runs = {"child": ["--init_from", parents["mlm"]], "scratch": ["--tokenizer", tokenizer]}
    checkpoints, stdout = {}, {}
    for name, extra in runs.items():
        result = run_in_process("train.py", *flags, *extra, "--out_dir", tmp_path / name)
        assert result.returncode == 0, result.stderr[-3000:]
        checkpoints[name], stdout[name] = load_checkpoint(str(tmp_path / name / "ckpt-00000005.pt")), result.stdout
    child, scratch = checkpoints["child"], checkpoints["scratch"]
    assert scratch["config"]["model"] == child["config"]["model"] and child["config"]["model"]["embed_norm"]
    for option in ("pooling", "classifier_attention", "labels"):
        assert scratch["config"]["obj"][option] == child["config"]["obj"][option], option
    assert child["config"]["obj"]["pooling"] == "mean"
    shapes = {name: {k: tuple(v.shape) for k, v in ckpt["model"].items()} for name, ckpt in checkpoints.items()}
    assert shapes["scratch"] == shapes["child"]
    # the 3-step mlm parent never left its unigram baseline, and its child is told so, in one line
    assert f"warning: --init_from {parents['mlm']}: at its last evaluation (step 3) mlm is still" in stdout["child"]


def test_init_from_refuses_another_shape_or_vocabulary_in_one_line(parents, labelled, tmp_path):
    base = ["train.py", "--objective", "classify", "--data", labelled[0], "--init_from", parents["mlm"], *TINY]
    assert_user_error(run_in_process(*base, "--out_dir", tmp_path / "a", "--n_embd", 64),
                      "its mlm backbone has n_embd=32 but --n_embd 64 was asked")
    assert_user_error(run_in_process(*base, "--out_dir", tmp_path / "b", "--vocab_size", 1024),
                      "its mlm backbone has vocab_size=512 but --vocab_size 1024 was asked")


def test_freeze_backbone_trains_the_head_only(parents, labelled, tmp_path):
    from minilm.checkpoint import load_checkpoint
    result = run_in_process("train.py", "--objective", "classify", "--data", labelled[0], "--val_data", labelled[1],
                            "--init_from", parents["mlm"], "--freeze_backbone", "--head_lr", "1e-2",
                            "--out_dir", tmp_path, "--max_steps", 5, *FLAGS)
    assert result.returncode == 0, result.stderr[-3000:]
    parent = load_checkpoint(parents["mlm"])["model"]
    child = load_checkpoint(str(tmp_path / "ckpt-00000005.pt"))
    own = backbone_of(child["model"])
    assert own and all(torch.equal(value, parent["backbone." + key]) for key, value in own.items())
    head = child["model"]["label_head.weight"]
    assert head.shape == (3, 32) and child["optimizer"]["state"]           # the head did train
    lrs = sorted({group["lr"] for group in child["optimizer"]["param_groups"] if group["params"]})
    assert len(lrs) == 1 and lrs[0] > 2e-3   # only the head's groups hold parameters, at --head_lr's scale


def test_layer_lr_decay_moves_each_layer_by_electras_power_of_the_decay(tokenizer):
    """One AdamW step from one gradient, the lr set as the trainer sets it (lr x the group's
    lr_scale): Adam's first update is lr x g / (|g| + eps), so each parameter moves by its own lr.
    ELECTRA's depths: embeddings 0, block i i + 1, the final norm n_layer + 1, the head n_layer + 2
    (here at --head_lr, which wins); depth d at lr x decay^(n_layer + 2 - d)."""
    from minilm.config import Config, ModelConfig
    from minilm.objectives import build_objective, model_config_for
    from minilm.optim import build_optimizer
    lr, decay, head_lr, n_layer = 1e-3, 0.5, 4e-3, 3
    cfg = Config()
    cfg.model = ModelConfig(vocab_size=tokenizer.vocab_size, seq_len=16, n_layer=n_layer, n_head=2, n_embd=16,
                            embed_norm=True)
    cfg.obj.labels, cfg.obj.layer_lr_decay, cfg.obj.head_lr = '["a", "b"]', decay, head_lr
    cfg.train.lr, cfg.train.weight_decay = lr, 0.0
    cfg.model = model_config_for("classify", cfg.model, cfg.obj)
    torch.manual_seed(0)
    objective = build_objective("classify", cfg.model, tokenizer, cfg.obj)
    optimizer = build_optimizer(objective, cfg.train, torch.device("cpu"))
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
    before = {name: p.detach().clone() for name, p in objective.named_parameters()}
    for p in objective.parameters():
        p.grad = torch.ones_like(p)          # every element moves: |g| >> eps
    optimizer.step()

    def expected(name: str) -> float:
        if name.startswith(("label_head.", "pooler.")):
            return head_lr
        parts = name.split(".")
        depth = int(parts[2]) + 1 if parts[1] == "blocks" else n_layer + 1 if parts[1] == "norm" else 0
        return lr * decay ** (n_layer + 2 - depth)

    seen = set()
    for name, p in objective.named_parameters():
        moved = (before[name] - p.detach()).abs()
        assert torch.allclose(moved, torch.full_like(moved, expected(name)), rtol=1e-3), name
        seen.add(expected(name))
    # embeddings d^5, blocks d^4 d^3 d^2, the final norm d, the head's own: six lrs, each reached
    assert len(seen) == n_layer + 3, sorted(seen)
    # under --optimizer muon the block matrices stay on Muon, each block in a group at its own scale
    cfg.train.optimizer = "muon"
    optimizer = build_optimizer(objective, cfg.train, torch.device("cpu"))
    names = {id(p): name for name, p in objective.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = names[id(p)]
            on_muon = ".blocks." in name and p.dim() == 2
            assert bool(group.get("muon")) == on_muon, name
            assert lr * group["lr_scale"] == pytest.approx(expected(name)), name


def test_resume_continues_a_classify_run(fine_tuned, tmp_path):
    import shutil
    out = tmp_path / "run"
    shutil.copytree(fine_tuned[0], out)
    result = run_in_process("train.py", "--out_dir", out, "--resume", "--max_steps", 62, "--device", "cpu")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout and "done: val loss" in result.stdout and "macro-F1" in result.stdout


@pytest.mark.parametrize("case", ["plain_text", "no_label_column", "builtin_corpus", "one_label"])
def test_bad_classify_input_is_one_line(case, tmp_path, labelled):
    flags = ["--objective", "classify", "--out_dir", tmp_path / "out", *TINY]
    if case == "plain_text":
        (tmp_path / "t.txt").write_text("just some text\nand more\n")
        result, fragments = run_in_process("train.py", *flags, "--data", tmp_path / "t.txt"), ["is plain text", "table"]
    elif case == "no_label_column":
        (tmp_path / "t.tsv").write_text("text\tcategory\nhello\ta\nworld\tb\n")
        result = run_in_process("train.py", *flags, "--data", tmp_path / "t.tsv")
        fragments = ["label", "--label_field"]
    elif case == "builtin_corpus":
        result, fragments = run_in_process("train.py", *flags), ["built-in corpus", "--data FILE"]
    else:
        rows = open(labelled[0]).read().splitlines()[1:]   # enough text for the tokenizer, one label
        (tmp_path / "t.tsv").write_text("text\tlabel\n" + "".join(row.split("\t")[0] + "\tonly\n" for row in rows))
        result, fragments = run_in_process("train.py", *flags, "--data", tmp_path / "t.tsv"), ["two labels or more"]
    assert_user_error(result, *fragments)


def test_classify_seq_len_too_small_is_refused_before_any_data_work(tmp_path, labelled):
    out = tmp_path / "out"
    flags = [flag for flag in TINY]
    flags[flags.index("--seq_len") + 1] = "2"
    result = run_in_process("train.py", "--objective", "classify", "--data", labelled[0], "--out_dir", out, *flags)
    assert_user_error(result, "[CLS] text [SEP]", "--seq_len 3 or more")
    assert "tokenizer" not in result.stdout and not (out / "data").exists() and not (out / "tokenizer.model").exists()


def test_a_large_confusion_matrix_is_summarized():
    """Past 20 labels: the labels with the most errors, with recall and precision, and the most
    frequent confusions, in a few dozen lines whatever the number of labels."""
    from minilm.objectives.classify import format_confusion
    K = 500
    names = [f"l{i}" for i in range(K)]
    confusion = torch.diag(torch.full((K,), 4))
    confusion[7, 7], confusion[7, 9] = 1, 3            # l7: recall 1/4, its rows go to l9
    confusion[9, 9], confusion[2, 9] = 4, 2            # l9: predicted 4 + 3 + 2 = 9 times, precision 4/9
    confusion[300, 301] = 3                            # l300 -> l301, as often as l7 -> l9
    text = format_confusion(confusion, names)
    lines = text.splitlines()
    assert lines[0].startswith("500 labels: the 500 x 500 matrix is too large to print") and len(lines) < 30
    rows = {line.split("|")[0].strip(): line.split("|")[1:] for line in lines[2:] if "|" in line}
    assert list(rows)[:2] == ["l9", "l7"]             # the most errors first: l9 5, l7 3 (then l300/l301 3)
    assert rows["l7"][0].split() == ["4", "0.250"] and rows["l9"][1].split() == ["9", "0.444"]
    at = lines.index("most frequent confusions (true -> predicted: rows):")
    assert lines[at + 1:] == ["  l7 -> l9: 3", "  l300 -> l301: 3", "  l2 -> l9: 2"]
    small = format_confusion(confusion[:20, :20], names[:20]).splitlines()
    assert len(small) == 21 and small[8].split("|")[1].split()[7:10] == ["1", "0", "3"]   # the whole matrix


def test_best_pt_holds_the_evaluation_with_the_best_macro_f1_not_the_best_accuracy(tmp_path, labelled, monkeypatch):
    """Three evaluations, made by hand, where accuracy and macro-F1 disagree: step 2 has the best
    macro-F1 (0.730, accuracy 0.8), step 3 the best accuracy (0.9, macro-F1 0.647: one label never
    predicted right). best.pt must be step 2's. The run is real; only the evaluation's sums are given."""
    from minilm.checkpoint import load_checkpoint
    from minilm.objectives import finalize
    from minilm.trainer import Trainer
    confusions = {1: [[6, 1, 1], [1, 0, 0], [0, 1, 0]],     # acc 0.6, macro-F1 0.267
                  2: [[6, 1, 1], [0, 1, 0], [0, 0, 1]],     # acc 0.8, macro-F1 0.730
                  3: [[8, 0, 0], [0, 1, 0], [1, 0, 0]]}     # acc 0.9, macro-F1 0.647

    def evaluate(self):
        confusion = torch.tensor(confusions[self.step], dtype=torch.float64)
        self.last_eval_sums = {"nll": torch.tensor(5.0), "targets": confusion.sum(),
                               "correct": confusion.diagonal().sum(), "confusion": confusion}
        return finalize({k: float(v) if v.numel() == 1 else v for k, v in self.last_eval_sums.items()},
                        self.objective)
    monkeypatch.setattr(Trainer, "evaluate", evaluate)
    out = tmp_path / "out"
    result = run_in_process("train.py", "--objective", "classify", "--data", labelled[0], "--val_data", labelled[1],
                            "--out_dir", out, "--max_steps", 3, "--eval_every", 1, *TINY)
    assert result.returncode == 0, result.stderr[-3000:]
    evals = [json.loads(line) for line in open(out / "metrics.jsonl") if "val_acc" in line]
    assert [(r["step"], r["val_acc"]) for r in evals] == [(1, 0.6), (2, 0.8), (3, 0.9)]
    assert max(evals, key=lambda r: r["val_acc"])["step"] == 3 and max(evals, key=lambda r: r["val_macro_f1"])["step"] == 2
    best = load_checkpoint(str(out / "best.pt"))
    assert best["step"] == 2 and best["best_value"] == pytest.approx(evals[1]["val_macro_f1"]) == pytest.approx((6 / 7 + 2 / 3 + 2 / 3) / 3)
    last = load_checkpoint(str(out / "ckpt-00000003.pt"))
    assert not torch.equal(best["model"]["label_head.weight"], last["model"]["label_head.weight"])


def test_tokens_per_second_and_mfu_count_the_rows_as_cut_not_seq_len(tmp_path):
    """Rows of 3 to 9 tokens in a seq_len 32 batch: make_batch cuts them to 9, and that is what
    runs (padding included). The trainer's tokens/s count 4 x 9 per step, and its MFU the FLOPs
    of 9-token rows: MFU x peak / tokens/s is the FLOPs per token of a 9-token row."""
    from minilm.config import Config, ModelConfig
    from minilm.objectives import build_objective
    from minilm.trainer import Trainer
    cfg = Config()
    cfg.model = ModelConfig(vocab_size=300, seq_len=32, n_layer=1, n_head=2, n_embd=32)
    cfg.obj.labels = '["a", "b"]'
    for key, value in dict(out_dir=str(tmp_path), batch_size=4, device="cpu", max_steps=2, log_every=2,
                           eval_every=10, ckpt_every=10, warmup_steps=1, objective="classify").items():
        setattr(cfg.train, key, value)
    lengths = torch.tensor([5, 9, 7, 3])
    raw = {"input_ids": torch.where(torch.arange(32) < lengths[:, None], 200, 0), "lengths": lengths,
           "labels": torch.tensor([0, 1, 0, 1]), "row_valid": torch.ones(4, dtype=torch.bool)}

    class Rows:
        def batch(self, step, micro=0):
            return raw

    torch.manual_seed(0)
    objective = build_objective("classify", cfg.model, None, cfg.obj)
    assert objective.tokens_and_flops(objective.make_batch(raw)) == (36, 36 * objective.flops_per_token(9))
    assert objective.flops_per_token(9) < objective.flops_per_token()          # seq_len's attention is longer
    trainer = Trainer(cfg, objective, Rows(), None, None, log=lambda *_: None)
    trainer.peak_flops = 1e12
    trainer.fit()
    row = json.loads(open(os.path.join(tmp_path, "metrics.jsonl")).readline())
    assert row["mfu"] * trainer.peak_flops / row["tokens_per_s"] == pytest.approx(objective.flops_per_token(9))


def test_shuffled_labels_warn_that_the_classifier_is_at_its_label_prior(labelled, fine_tuned, tmp_path):
    """Labels shuffled over the rows leave nothing to learn: past a quarter of the run the val loss is
    no better than the label prior's, and the run says so once; the learnable run says nothing."""
    rows = open(labelled[0], encoding="utf-8").read().splitlines()
    texts, labels = zip(*(row.split("\t") for row in rows[1:]))
    labels = list(labels)
    random.Random(0).shuffle(labels)
    shuffled = tmp_path / "shuffled.tsv"
    shuffled.write_text("text\tlabel\n" + "".join(f"{t}\t{l}\n" for t, l in zip(texts, labels)), encoding="utf-8")
    result = run_in_process("train.py", "--objective", "classify", "--data", shuffled, "--val_data", labelled[1],
                            "--out_dir", tmp_path / "out", "--max_steps", 40, "--eval_every", 20, *FLAGS)
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stdout.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "classify is still at its trivial baseline (the label prior" in warnings[0], \
        result.stdout[-3000:]
    assert "warning:" not in fine_tuned[1]
    records = [json.loads(line) for line in open(tmp_path / "out" / "metrics.jsonl")]
    assert [r["val_baseline_loss"] for r in records if "val_baseline_loss" in r] == \
        pytest.approx([entropy_of([11, 10, 10])] * 2)   # the 31 validation rows' labels, 11/10/10


def entropy_of(counts: list[int]) -> float:
    """The label prior's loss as base.prior_entropy estimates it: entropy + (K - 1) / 2N."""
    import math
    n = sum(counts)
    return -sum(c / n * math.log(c / n) for c in counts if c) + (len(counts) - 1) / (2 * n)


def test_a_classifier_parent_gives_its_head_only_to_the_same_labels():
    """The run hooks classify overrides (objectives/base.py): a classifier parent is never trained
    again without --objective; its head is taken by a child with the same label set and starts
    afresh in one with another (its outputs would mean other labels); the report is the
    confusion matrix."""
    from minilm.config import Config, ModelConfig, ObjectiveConfig
    from minilm.errors import UserError
    from minilm.objectives import build_objective
    from minilm.provenance import config_for_init, load_parent_weights
    model = ModelConfig(vocab_size=300, seq_len=32, n_layer=1, n_head=2, n_embd=32)
    parent_cfg = Config(model=model)
    parent_cfg.train.objective, parent_cfg.obj.labels = "classify", '["a", "b"]'
    torch.manual_seed(0)
    parent = build_objective("classify", model, None, parent_cfg.obj)
    state = {"model": parent.state_dict(), "config": parent_cfg.to_dict(), "objective": "classify", "step": 3}
    with pytest.raises(UserError, match=r"^--init_from p.pt is a classifier: pass --objective classify to fine-tune"):
        config_for_init([], state, "p.pt")
    for labels, kept in (('["a", "b"]', True), ('["b", "c"]', False)):
        torch.manual_seed(1)
        child = build_objective("classify", model, None, ObjectiveConfig(labels=labels))
        load_parent_weights(child, state, "p.pt", log=lambda *_: None)
        assert torch.equal(child.label_head.weight, parent.label_head.weight) == kept, labels
        assert torch.equal(child.backbone.tok_emb.weight, parent.backbone.tok_emb.weight)
    assert child.report({}) is None
    assert child.report({"confusion": torch.tensor([[3, 1], [0, 2]])}).startswith("confusion matrix of the validation")
