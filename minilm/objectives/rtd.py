"""Replaced-token detection (ELECTRA, Clark et al. 2020, "ELECTRA: Pre-training Text Encoders as
Discriminators Rather Than Generators").

The idea: a small masked LM (the generator) fills in ~15% of the tokens with plausible samples, and
the encoder we keep (the discriminator) is trained to tell, for every token, whether it is the
original or a replacement. The discriminator thus learns from all positions, not only the 15% a
masked LM predicts, which makes it far more sample-efficient for the same compute.

One training step, as in google-research/electra (run_pretraining.py, pretrain_helpers.mask):
  1. choose: each eligible (non-special, non-padding) token independently with probability
     mask_prob = 0.15 (--mask_prob; the masked-LM family's rule, minilm/masking.py);
  2. mask: of the chosen, 85% are shown to the generator as <mask> and 15% unchanged; ELECTRA uses
     no random replacement (pretrain_helpers.mask: tf.less(uniform, 0.85)). --rtd_replacement bert
     restores BERT's 80/10/10 (--mask_replace_prob, --random_replace_prob);
  3. the generator predicts the original token at every chosen position (cross-entropy);
  4. sample: each chosen position gets a token drawn from the generator's softmax at temperature 1
     (--generator_temperature), with no gradient through the sampling (ELECTRA's _get_fake_data:
     tf.stop_gradient). The chosen positions shown unchanged are resampled too, as in ELECTRA
     (it unmasks, then scatters the samples into every chosen position);
  5. the discriminator reads the corrupted input (the original with the samples in place) and
     labels every non-pad token: replaced iff it differs from the original. A sample that equals
     the original counts as original (ELECTRA: labels = masked * (updated != original)).
Loss = generator MLM loss + rtd_weight (50, ELECTRA's disc_weight; gen_weight is 1) x
discriminator binary cross-entropy. The generator's loss is summed over the chosen tokens and
divided by the step's chosen count, the discriminator's summed over every non-pad token and
divided by the step's non-pad count (two entries of batch["counts"], so gradient accumulation and
DDP give exactly the gradient of one big batch; base.py).

The networks (configure_pretraining.py: generator_hidden_size 0.25, generator_layers 1.0):
  * discriminator = `backbone`, a minilm Transformer encoder (mask None, or a padding mask) with
    ELECTRA's per-token head: Linear C->C, GELU, Linear C->1 (discriminator_predictions). It is
    what fine-tuning and --init_from take: "backbone.*" in the checkpoint.
  * generator: an encoder of the same depth, width generator_fraction (0.25) of the
    discriminator's with the head size D kept, i.e. max(1, round(H * fraction)) heads of D (for a
    4-head 256-wide discriminator: 1 head, 64 wide; MLP 4x its own width, or the discriminator's
    --intermediate_size scaled by the same ratio), and BERT's MLM head (mlm.py's MLMHead) whose
    transform maps its width to the embedding width E, tied to the E-wide token matrix (ELECTRA's
    get_masked_lm_output: dense to embedding_size, GELU, LayerNorm, then the shared table). Like the masked LMs, its head and last block
    run only at the chosen positions (Transformer's outputs_at).
  * shared embeddings: the token table, the position table (--position learned), the segment
    table and the embedding norm are the SAME Parameter objects in both networks (ELECTRA's
    untied_generator_embeddings = False). They are E = --embedding_size wide (0: the
    discriminator's width C, unfactorized). Each network reads them through its own Linear
    projection E -> its width when the two differ (ELECTRA's "embeddings_project"): the
    discriminator through its backbone's embed_project (model.py), the generator through its
    own. RoPE has no parameters: each network rotates with its own (identical) tables.
  * --embedding_sharing changes the token table alone (the other tables stay shared): electra
    (the default) as above; none, a table each (the generator's head tied to its own); gdes,
    DeBERTa-v3's gradient-disentangled sharing (DisentangledEmbedding): the discriminator reads
    the generator's table without its gradient plus a zero-initialised residual table, so each
    loss trains a table of its own. DeBERTa-v3 found the two losses pulling one shared table
    apart ("tug-of-war"); benchmarks/README.md ("rtd") measures the cosine of their gradients on it.

Sampling is exact and reproducible: make_batch draws one uniform u per chosen position from the
step's torch.Generator (so a resumed run samples what it would have sampled), and the forward
takes the first id whose cumulative probability exceeds u (inverse-CDF sampling, on (N, V)
tensors, no Python loop). make_batch cannot sample itself: the logits do not exist yet.

Shapes: raw (B, T+1) from "blocks" (the first T = seq_len used) -> input_ids (B, T) (original),
masked_ids (B, T) (what the generator reads), positions (N,) flat indices b*T + t of the chosen
tokens, targets (N,), sample_noise (N,), valid (B, T) bool (non-pad). Forward: generator (N, C_g)
-> logits (N, V) -> sampled (N,) -> corrupted (B, T) -> discriminator (B, T, C) -> logits (B, T).

Metrics: "generator/*" (loss, acc: argmax == original at the chosen positions) and
"discriminator/*" (loss, acc over non-pad tokens, precision and recall of "replaced", and
positive_share: the share of tokens actually replaced); "loss" is the trained sum
gen loss + rtd_weight x disc loss.

Training defaults (train_defaults, base.py): lr 5e-4 and min_lr 5e-5, ELECTRA-Small's peak lr,
where the other objectives take the causal LM's 2e-3; --lr and --min_lr still win. ELECTRA's
warmup (10k of 1M steps), Adam beta2 0.999 and eps 1e-6 are not defaults here.

Where we differ from the references:
  * Choosing: each eligible token independently with p = 0.15 (a binomial count, as our other
    masked LMs and HF's collator). ELECTRA draws round(0.15 * n) positions per row with
    replacement (tf.random.categorical), so duplicates make the distinct count slightly smaller;
    its n also counts [CLS] and [SEP]. We have no [CLS]/[SEP] framing (see mlm.py).
  * Embedding width: by default (--embedding_size 0) the tables are the discriminator's width and
    only the generator projects. ELECTRA-Small factorizes them (configure_pretraining.py's "small"
    overrides: embedding_size 128, hidden_size 256, 12 layers, 4 heads, intermediate 1024,
    generator 0.25 -> 64 wide), projected up to the discriminator's 256 and down to the
    generator's 64; Base and Large do not (embedding = hidden). ELECTRA-Small's shape:
    --objective rtd --n_layer 12 --n_embd 256 --n_head 4 --embedding_size 128 --seq_len 128
    (--generator_fraction 0.25, --intermediate_size 0 = 1024 are the defaults).
  * The encoders are minilm's pre-norm Transformer (RoPE, RMSNorm by default), with the masked LMs'
    embedding norm (embed_norm, declared in model_settings), not BERT's post-norm.
  * HF's transformers has no ELECTRA pretraining loop; its examples (and the peers benchmark)
    sample with torch.multinomial, which is the same law.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F

from minilm import masking
from minilm.errors import UserError
from minilm.flops import parameters_of, transformer_flops
from minilm.model import Transformer, padding_mask
from minilm.losses import step_mean
from minilm.objectives.base import Baseline, Objective
from minilm.objectives.mlm import MLMHead
from minilm.tokenizer import MASK_ID, NUM_SPECIAL

ELECTRA_MASK_SHARE = 0.85   # of the chosen tokens, shown as <mask>; the rest unchanged (no random)


def generator_config(cfg, fraction: float):
    """The generator's ModelConfig: the discriminator's `cfg` with max(1, round(n_head * fraction))
    heads of the same size, so n_embd = heads * head_dim; an explicit intermediate_size is scaled
    by the same width ratio (0 keeps the 4x default). Always tied: its head is the token matrix.
    Unfactorized: the Generator itself projects the shared E-wide tables to its width."""
    n_head = max(1, round(cfg.n_head * fraction))
    width = n_head * cfg.head_dim
    intermediate = max(1, round(cfg.intermediate_size * width / cfg.n_embd)) if cfg.intermediate_size else 0
    return dataclasses.replace(cfg, n_head=n_head, n_embd=width, intermediate_size=intermediate,
                               tie_embeddings=True, embedding_size=0)   # its projection: Generator


class Generator(Transformer):
    """ELECTRA's generator: a (narrower) Transformer encoder whose embeddings are the
    discriminator's, the very same modules, E wide, followed by its projection E -> C_g.

    Built unfactorized (cfg.embedding_size 0: ELECTRA-Small's E = 128 is wider than its 64-wide
    generator, which a factorized ModelConfig does not allow), then given the shared tables and
    its own embed_project when E != C_g. Its head (GeneratorHead) maps C_g -> E itself."""

    def __init__(self, cfg, shared: Transformer, own_token_table: bool = False):
        super().__init__(cfg)
        width = shared.cfg.embedding_width
        self.own_token_table = own_token_table
        if own_token_table:   # --embedding_sharing none or gdes: a token table of its own, E wide
            self.tok_emb = nn.Embedding(shared.cfg.vocab_size, width)
            Transformer._init_weights(self.tok_emb)
        self.read_tables_of(shared)
        self.embed_project = nn.Linear(width, cfg.n_embd, bias=cfg.bias) if width != cfg.n_embd else None
        if self.embed_project is not None:
            Transformer._init_weights(self.embed_project)

    def read_tables_of(self, shared: Transformer) -> None:
        """Replace the tables built for cfg by the discriminator's: one Parameter each, in both
        networks (the token table too, unless the generator has its own)."""
        self.pos_emb, self.seg_emb, self.embed_norm = shared.pos_emb, shared.seg_emb, shared.embed_norm
        if not self.own_token_table:
            self.tok_emb = shared.tok_emb


class DisentangledEmbedding(nn.Module):
    """DeBERTa-v3's gradient-disentangled embedding sharing (He et al. 2021, "DeBERTaV3"), the
    discriminator's token table under --embedding_sharing gdes: the generator's table without its
    gradient, plus a residual table of its own that starts at zero,
        weight = stop_gradient(E_generator) + E_delta.
    The generator's loss alone trains E_generator and the discriminator's loss alone E_delta, so
    the two losses no longer pull one table two ways. Its state_dict also holds the sum as
    "weight", so the discriminator's checkpoint holds the table it reads (what --init_from and
    fine-tuning take); loading ignores that entry, which E_generator and E_delta determine."""

    def __init__(self, generator_table: nn.Embedding):
        super().__init__()
        self.delta = nn.Parameter(torch.zeros_like(generator_table.weight))
        self.generator_table = (generator_table,)   # a tuple: the generator owns it, not a submodule
        self.register_state_dict_post_hook(self._add_weight)
        self.register_load_state_dict_pre_hook(self._drop_weight)

    @property
    def weight(self) -> torch.Tensor:
        return self.generator_table[0].weight.detach() + self.delta

    def forward(self, ids):
        return F.embedding(ids, self.weight)

    @staticmethod
    def _add_weight(module, state, prefix, local_metadata):
        state[prefix + "weight"] = module.weight.detach()

    @staticmethod
    def _drop_weight(module, state, prefix, *args):
        state.pop(prefix + "weight", None)


class GeneratorHead(MLMHead):
    """BERT's MLM head with its transform from the generator's width to the embedding width E, so
    the tied token matrix (V, E) applies: (N, C_g) -> (N, V)."""

    def __init__(self, cfg, generator_width: int):
        super().__init__(cfg, cfg.embedding_width)     # cfg: the discriminator's (norm, bias of V)
        self.dense = nn.Linear(generator_width, cfg.embedding_width, bias=cfg.bias)
        Transformer._init_weights(self.dense)


class DiscriminatorHead(nn.Module):
    """ELECTRA's discriminator_predictions: Linear C->C, GELU, Linear C->1. (..., C) -> (...) logits
    of "this token was replaced". With biases, as ELECTRA's dense layers."""

    def __init__(self, cfg):
        super().__init__()
        self.dense = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.out = nn.Linear(cfg.n_embd, 1)
        for layer in (self.dense, self.out):
            Transformer._init_weights(layer)

    def forward(self, hidden):
        return self.out(F.gelu(self.dense(hidden))).squeeze(-1)


def sample_from_logits(logits: torch.Tensor, noise: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """One id per row from softmax(logits / temperature), by inverse CDF: logits (N, V), noise (N,)
    uniform in [0, 1) -> (N,) long, the first id whose cumulative (unnormalized) probability exceeds
    noise * total. Ids of probability 0 are never drawn. No gradient (the caller passes detached
    logits)."""
    weights = torch.exp((logits.float() - logits.float().amax(dim=-1, keepdim=True)) / temperature)  # (N, V)
    cumulative = weights.cumsum(dim=-1)                                                      # (N, V)
    threshold = noise[:, None].to(cumulative.dtype) * cumulative[:, -1:]                     # (N, 1)
    return torch.searchsorted(cumulative, threshold, right=True).squeeze(1).clamp(max=logits.shape[-1] - 1)


class ReplacedTokenDetection(Objective):
    name = "rtd"
    data = "blocks"
    model_kind = "encoder"
    fills_masks = False
    scores_tokens = True
    reads_padded_rows = True
    # the encoders normalize their embeddings (mlm.py); the generator's head is the token matrix,
    # so the discriminator needs no separate LM head either
    model_settings = {"embed_norm": True, "tie_embeddings": True}
    # ELECTRA-Small's peak lr (and a tenth of it at the end), not the causal LM's 2e-3, at which the
    # discriminator stays at the all-original base rate (benchmarks/README.md, "rtd: why the
    # discriminator stays at its base rate")
    train_defaults = {"lr": 5e-4, "min_lr": 5e-5}
    baseline = Baseline("every token called by the base rate of replaced ones", part="discriminator", margin=0.02,
                        hint="--embedding_sharing none, which gave the discriminator its clearest lead")

    def __init__(self, model_cfg, tokenizer=None, options=None):
        super().__init__()
        if options is None:
            from minilm.config import ObjectiveConfig
            options = ObjectiveConfig()
        options.validate()
        self.options = options
        self.seq_len = model_cfg.seq_len
        self.backbone = self.build_backbone(model_cfg)                     # the discriminator
        # no LM head on the discriminator: a factorized backbone's C -> E projection would be a
        # weight that no loss reaches (DDP refuses those); the generator's head maps to E itself
        self.backbone.head_project = None
        self.discriminator_head = DiscriminatorHead(model_cfg)
        sharing = options.embedding_sharing
        self.generator = Generator(generator_config(model_cfg, options.generator_fraction), self.backbone,
                                   own_token_table=sharing != "electra")
        if sharing == "gdes":   # the discriminator reads the generator's table (no gradient) + its own residual
            self.backbone.tok_emb = DisentangledEmbedding(self.generator.tok_emb)
        self.generator_head = GeneratorHead(model_cfg, self.generator.cfg.n_embd)
        V = model_cfg.vocab_size
        special = tokenizer.special_table if tokenizer is not None else torch.arange(V) < NUM_SPECIAL
        self.register_buffer("special_table", special.clone(), persistent=False)
        self.register_buffer("random_ids", torch.nonzero(~special).squeeze(1), persistent=False)

    def backbone_replaced(self) -> None:
        """In a+b the discriminator is the shared backbone (multitask.py): the generator reads its
        tables, not those of the backbone this objective built and dropped."""
        if self.options.embedding_sharing == "gdes":
            raise UserError("--embedding_sharing gdes is for --objective rtd alone: in a+b the other parts "
                            "would read the discriminator's disentangled table")
        self.generator.read_tables_of(self.backbone)

    def replacement_shares(self) -> tuple[float, float]:
        """(shown as <mask>, shown as a random token) among the chosen; the rest are unchanged."""
        if self.options.rtd_replacement == "bert":
            return self.options.mask_replace_prob, self.options.random_replace_prob
        return ELECTRA_MASK_SHARE, 0.0

    # --------------------------------------------------------------- data
    def make_batch(self, raw, generator=None, lengths=None):
        """raw (B, T+1) -> model inputs (module docstring); `lengths` (B,) for right-padded rows."""
        ids = raw[:, :self.seq_len]
        B, T = ids.shape
        eligible = masking.eligible_positions(ids, self.special_table, lengths)
        chosen = masking.choose_bernoulli(eligible, self.options.mask_prob, generator)
        mask_share, random_share = self.replacement_shares()
        masked_ids, _ = masking.replace(ids, chosen, generator, MASK_ID, self.random_ids, mask_share, random_share)
        positions = torch.nonzero(chosen.flatten()).squeeze(1)                 # (N,) flat b*T + t
        valid = (torch.ones_like(chosen) if lengths is None
                 else torch.arange(T, device=ids.device)[None, :] < lengths[:, None])
        batch = {"input_ids": ids, "masked_ids": masked_ids, "positions": positions,
                 "targets": ids.flatten()[positions], "valid": valid,
                 # drawn here, from the step's generator, so that resuming reproduces the samples
                 "sample_noise": torch.rand(len(positions), generator=generator, device=ids.device),
                 "counts": {"targets": chosen.sum(), "tokens": valid.sum()}}
        if lengths is not None:
            batch["attn_mask"] = padding_mask(lengths, T)
        return batch

    # --------------------------------------------------------------- model
    def corrupt(self, batch, sampled):
        """The discriminator's input and labels: the original ids with `sampled` (N,) at the chosen
        positions, (B, T); replaced (B, T) bool, True where the sample differs from the original
        (never at a pad: nothing is chosen there)."""
        ids, positions = batch["input_ids"], batch["positions"]
        corrupted = ids.flatten().scatter(0, positions, sampled).view_as(ids)
        return corrupted, corrupted != ids

    def generator_logits(self, batch):
        """The generator's logits at the chosen positions, (N, V), fp32 for a stable softmax."""
        picked = self.generator(batch["masked_ids"], mask=batch.get("attn_mask"),
                                outputs_at=batch["positions"])                 # (N, C_g)
        return self.generator_head(picked, self.generator.tok_emb.weight).float()

    def discriminator_logits(self, ids, attn_mask=None):
        """(B, T) ids -> (B, T) logits of "replaced"."""
        return self.discriminator_head(self.backbone(ids, mask=attn_mask)).float()

    @torch.no_grad()
    def replaced_probabilities(self, input_ids, attn_mask=None):
        """What sample.py --score shows: (B, T) -> (B, T), the discriminator's P(replaced)."""
        return torch.sigmoid(self.discriminator_logits(input_ids, attn_mask))

    def forward(self, batch, totals=None):
        targets, valid = batch["targets"], batch["valid"]
        logits = self.generator_logits(batch)                                           # (N, V)
        generator_nll = F.cross_entropy(logits, targets, reduction="sum")
        with torch.no_grad():   # no gradient flows through the sampling (ELECTRA's stop_gradient)
            sampled = sample_from_logits(logits, batch["sample_noise"], self.options.generator_temperature)
            corrupted, replaced = self.corrupt(batch, sampled)
        detector_logits = self.discriminator_logits(corrupted, batch.get("attn_mask"))  # (B, T)
        per_token = F.binary_cross_entropy_with_logits(detector_logits, replaced.float(), reduction="none")
        discriminator_nll = (per_token * valid).sum()
        weight = self.options.rtd_weight
        loss = step_mean(generator_nll, batch, totals) + step_mean(weight * discriminator_nll, batch, totals, "tokens")
        with torch.no_grad():
            called = (detector_logits > 0) & valid
            replaced &= valid
            sums = {"generator/nll": generator_nll.detach(), "generator/targets": batch["counts"]["targets"],
                    "generator/correct": (logits.argmax(-1) == targets).sum(),
                    "generator/weighted_nll": generator_nll.detach(),
                    "discriminator/nll": discriminator_nll.detach(), "discriminator/targets": batch["counts"]["tokens"],
                    "discriminator/correct": ((called == replaced) & valid).sum(),
                    "discriminator/weighted_nll": weight * discriminator_nll.detach(),
                    "discriminator/true_positives": (called & replaced).sum(),
                    "discriminator/predicted_positives": called.sum(),
                    "discriminator/positives": replaced.sum()}
        return loss, sums

    def flops_per_token(self) -> float:
        """Training FLOPs per input token (for MFU), the generic count (flops.transformer_flops) of
        two passes: the discriminator and its head everywhere; the generator's outputs and its
        head (with the tied token matrix) at the mask_prob share of positions, as mlm.py counts.
        The sampling is not counted."""
        disc, gen = self.backbone, self.generator
        discriminator = transformer_flops(disc, disc.cfg.seq_len, head=parameters_of(self.discriminator_head))
        generator_head = parameters_of(self.generator_head) + gen.tok_emb.weight.numel()
        generator = transformer_flops(gen, gen.cfg.seq_len, outputs_share=self.options.mask_prob, head=generator_head)
        return discriminator + generator
