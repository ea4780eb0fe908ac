"""One process of a distributed test run, started by torchrun from tests/test_distributed.py.

usage: dist_worker.py OUT_DIR DATA_DIR TOKENIZER STEPS UNTIL ACCUM FSDP RESUME [OBJECTIVE [DROPOUT [OPTIMIZER]]]
       dist_worker.py OUT_DIR DATA_DIR classify_eval   (DATA_DIR: prepared labelled rows; one evaluation,
                      OUT_DIR/eval-rank{R}.json: the validation rows this rank visited and the metrics)
Trains the tiny test model with the real Trainer (objective clm and dropout 0 unless given), then
writes what the test compares: OUT_DIR/params-rank{R}.pt (full, unsharded weights as this rank sees
them), OUT_DIR/history-rank{R}.json (the losses of the steps this process trained),
OUT_DIR/rng-rank{R}.pt (this process's torch RNG state at the end: its dropout noise) and, under
DDP, OUT_DIR/allreduce-rank{R}.json (how many gradient all-reduce rounds ran).
"""
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from minilm.checkpoint import newest_loadable  # noqa: E402
from minilm.config import Config, ModelConfig  # noqa: E402
from minilm.data import make_source, mix_seed  # noqa: E402
from minilm.distributed import exit_process, full_state_dicts, setup  # noqa: E402
from minilm.objectives import build_objective  # noqa: E402
from minilm.tokenizer import Tokenizer  # noqa: E402
from minilm.trainer import Trainer  # noqa: E402


def tiny_config(out_dir, vocab_size, steps, accum, fsdp=False, dropout=0.0):
    cfg = Config()
    cfg.model = ModelConfig(vocab_size=vocab_size, seq_len=32, n_layer=2, n_head=2, n_embd=64, dropout=dropout)
    cfg.train.out_dir = str(out_dir)
    cfg.train.batch_size = 4
    cfg.train.grad_accum = accum
    cfg.train.max_steps = steps
    cfg.train.device = "cpu"
    cfg.train.log_every = 1
    cfg.train.eval_every = 10_000
    cfg.train.ckpt_every = 10_000
    cfg.train.warmup_steps = 2
    cfg.train.fsdp = fsdp
    return cfg


def count_allreduce_rounds(model) -> list:
    """Under DDP, a list that gains one entry per gradient all-reduce round (its bucket 0), through
    a comm hook that otherwise does what DDP does by default (all-reduce, then average)."""
    rounds: list = []
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def counting_hook(process_group, bucket):
            if bucket.index() == 0:
                rounds.append(1)
            return allreduce_hook(process_group, bucket)
        model.register_comm_hook(None, counting_hook)
    return rounds


def classify_eval(out_dir, data_dir):
    """One Trainer.evaluate of a fresh classifier over labelled validation rows (batches of 4)."""
    from minilm.data import LabelledSource, load_meta
    torch.set_num_threads(1)
    info, _ = setup("cpu")
    os.makedirs(out_dir, exist_ok=True)
    tokenizer = Tokenizer.load(os.path.join(data_dir, "tokenizer.model"))
    cfg = tiny_config(out_dir, tokenizer.vocab_size, 1, 1)
    cfg.obj.labels = json.dumps(load_meta(data_dir)["labels"])
    torch.manual_seed(0)
    objective = build_objective("classify", cfg.model, tokenizer, cfg.obj)
    val = LabelledSource(data_dir, "val", cfg.model.seq_len, cfg.train.batch_size)
    seen, original = [], val.eval_batch

    def recording(i):
        batch = original(i)
        seen.extend(batch["rows"][batch["row_valid"]].tolist())
        return batch
    val.eval_batch = recording
    trainer = Trainer(cfg, objective, LabelledSource(data_dir, "train", 32, 4), val, tokenizer, log=print, dist_info=info)
    metrics = trainer.evaluate()
    with open(os.path.join(out_dir, f"eval-rank{info.rank}.json"), "w") as f:
        json.dump({"rows": seen, "metrics": metrics,
                   "confusion": trainer.last_eval_sums["confusion"].tolist()}, f)
    exit_process(0)


def main():
    if sys.argv[3] == "classify_eval":
        return classify_eval(sys.argv[1], sys.argv[2])
    out_dir, data_dir, tok_path = sys.argv[1:4]
    steps, until, accum = (int(x) for x in sys.argv[4:7])
    fsdp, resume = sys.argv[7] == "1", sys.argv[8] == "1"
    objective_name = sys.argv[9] if len(sys.argv) > 9 else "clm"
    dropout = float(sys.argv[10]) if len(sys.argv) > 10 else 0.0
    optimizer = sys.argv[11] if len(sys.argv) > 11 else "adamw"
    torch.set_num_threads(1)
    info, _ = setup("cpu")
    os.makedirs(out_dir, exist_ok=True)
    tokenizer = Tokenizer.load(tok_path)
    cfg = tiny_config(out_dir, tokenizer.vocab_size, steps, accum, fsdp, dropout)
    cfg.train.optimizer = optimizer
    torch.manual_seed(0)
    objective = build_objective(objective_name, cfg.model, tokenizer)
    train = make_source(objective.data, data_dir, "train", cfg.model.seq_len, cfg.train.batch_size,
                        seed=cfg.train.seed, log=None)   # blocks, or simcse's sentences
    torch.manual_seed(mix_seed(cfg.train.seed, info.rank))  # as train.py: dropout noise differs across ranks
    trainer = Trainer(cfg, objective, train, None, tokenizer, log=print, dist_info=info)
    rounds = count_allreduce_rounds(trainer.model)
    if resume:
        path, state = newest_loadable(out_dir)
        trainer.load(path, state)
    else:  # the gradient of the first step, as this rank holds it after DDP's all-reduce
        trainer.accumulate_gradients(0)
        grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().clone()
                 for n, p in trainer.objective.named_parameters()}
        torch.save(grads, os.path.join(out_dir, f"grads-rank{info.rank}.pt"))
        trainer.optimizer.zero_grad(set_to_none=True)
    history = trainer.fit(until=until)
    model_state, _ = full_state_dicts(trainer.objective, trainer.optimizer, fsdp)
    torch.save({k: v.detach().cpu() for k, v in model_state.items()}, os.path.join(out_dir, f"params-rank{info.rank}.pt"))
    torch.save(torch.get_rng_state(), os.path.join(out_dir, f"rng-rank{info.rank}.pt"))
    with open(os.path.join(out_dir, f"history-rank{info.rank}.json"), "w") as f:
        json.dump(history, f)
    with open(os.path.join(out_dir, f"allreduce-rank{info.rank}.json"), "w") as f:
        json.dump(len(rounds), f)
    exit_process(0)  # not a plain return: see exit_process for the gloo abort it avoids


if __name__ == "__main__":
    main()
