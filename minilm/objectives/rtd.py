"""Replaced-token detection (ELECTRA, Clark et al. 2020).

A small masked LM (the generator) fills in some tokens with samples, and the encoder we keep (the
discriminator) learns to tell, for every token, original or replaced: it learns from every position.

One step, as google-research/electra (run_pretraining.py, pretrain_helpers.mask):
  1. choose each eligible (non-special, non-pad) token with probability --mask_prob 0.15;
  2. show 85% of the chosen to the generator as <mask> and 15% unchanged, none random
     (tf.less(uniform, 0.85)); --rtd_replacement bert gives BERT's 80/10/10 instead;
  3. the generator predicts the original at every chosen position;
  4. every chosen position (unchanged ones too) gets a token sampled from the generator's softmax
     at --generator_temperature 1, no gradient through it (ELECTRA's stop_gradient), by inverse
     CDF of a uniform drawn in make_batch from the step's generator (resuming samples the same);
  5. the discriminator reads the corrupted text and labels each non-pad token replaced iff it
     differs from the original (a sample equal to the original counts as original).
Loss = generator cross-entropy / the step's chosen count + --rtd_weight 50 x discriminator binary
cross-entropy / the step's non-pad count (ELECTRA's gen_weight 1 and disc_weight 50). Defaults:
lr 5e-4 and min_lr 5e-5 (ELECTRA-Small's peak lr); an explicit flag wins.

The networks (configure_pretraining.py: generator_hidden_size 0.25, generator_layers 1.0):
  * discriminator = `backbone`, an encoder, with ELECTRA's head Linear C->C, GELU, Linear C->1;
    it is what --init_from and fine-tuning take;
  * generator: the same depth, max(1, round(H x --generator_fraction 0.25)) heads of the same
    size, and mlm.py's head mapping its width to the embedding width E, tied to the token table;
  * the token, position and segment tables and the embedding norm are the same Parameters in both
    (untied_generator_embeddings = False), E = --embedding_size wide (0: the discriminator's
    width); each network projects E to its own width where they differ. --embedding_sharing none
    gives the generator its own token table; gdes is DeBERTa-v3's gradient-disentangled sharing
    (the generator's table without its gradient plus a zero-initialised residual table).

Shapes: raw (B, T+1) from "blocks" (the first T used) -> input_ids, masked_ids (B, T), positions
(N,) flat indices of the chosen, targets and sample_noise (N,), valid (B, T) bool. Forward:
generator (N, C_g) -> logits (N, V) -> sampled (N,) -> corrupted (B, T) -> discriminator
(B, T, C) -> logits (B, T). Metrics: generator/ loss, acc; discriminator/ loss, acc, precision,
recall (of "replaced"), positive_share.

Where we differ from ELECTRA:
  * each token is chosen independently (a binomial count); ELECTRA draws round(0.15 n) positions
    with replacement (tf.random.categorical), n counting [CLS] and [SEP], which we do not have;
  * the tables are unfactorized by default; ELECTRA-Small's shape is --n_layer 12 --n_embd 256
    --n_head 4 --embedding_size 128 --seq_len 128;
  * pre-norm encoders with the masked LMs' embedding norm, not BERT's post-norm; ELECTRA's warmup
    (10k steps), Adam beta2 0.999 and eps 1e-6 are not defaults.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from minilm import masking
from minilm.errors import UserError
from minilm.flops import parameters_of, transformer_flops
from minilm.model import Transformer, padding_mask
from minilm.losses import step_mean
from minilm.objectives.base import Baseline, Objective
from minilm.objectives.mlm import MaskedLMOptions, MLMHead
from minilm.options import option
from minilm.tokenizer import MASK_ID, NUM_SPECIAL

ELECTRA_MASK_SHARE = 0.85   # of the chosen tokens, shown as <mask>; the rest unchanged (no random)


@dataclass
class ReplacedTokenDetectionOptions(MaskedLMOptions):
    """The masked LM's options (its masking reads --mask_prob too), and the generator's."""
    generator_fraction: float = option(0.25, "rtd: the generator's width as a share of the discriminator's "
                                             "(head size kept, so its heads are scaled; at least one)",
                                       within="(0, 1]")
    rtd_weight: float = option(50.0, "rtd: loss = generator MLM loss + this x discriminator loss",
                               at_least=0)
    rtd_replacement: str = option("electra", "rtd: what the generator sees at a chosen token: electra (85% "
                                             "<mask>, 15% unchanged) or bert (--mask_replace_prob / "
                                             "--random_replace_prob, 80/10/10)", choices=("electra", "bert"))
    generator_temperature: float = option(1.0, "rtd: replacements are sampled from softmax(generator logits "
                                               "/ this)", above=0)
    embedding_sharing: str = option("electra", "rtd: the token table of the generator and the discriminator: "
                                               "electra (one table), none (one each) or gdes (the "
                                               "discriminator's is the generator's, without its gradient, "
                                               "plus a residual of its own: DeBERTa-v3)",
                                    choices=("electra", "none", "gdes"))


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
    capabilities = frozenset({"score", "embed"})   # score: the discriminator's P(replaced) per token
    token_score = "P(replaced)"
    reads_padded_rows = True
    Options = ReplacedTokenDetectionOptions
    # ELECTRA-Small's peak lr (and a tenth of it at the end), not the causal LM's 2e-3, at which the
    # discriminator stays at the all-original base rate (benchmarks/README.md, "rtd: why the
    # discriminator stays at its base rate")
    defaults = {"lr": 5e-4, "min_lr": 5e-5}
    baseline = Baseline("every token called by the base rate of replaced ones", part="discriminator", margin=0.02,
                        hint="--embedding_sharing gdes (none in a+b), which gave the discriminator its clearest lead")

    @classmethod
    def configure(cls, model_cfg, options):
        # the encoders normalize their embeddings (mlm.py); the generator's head is the token matrix,
        # so the discriminator needs no separate LM head either
        return dataclasses.replace(model_cfg, embed_norm=True, tie_embeddings=True)

    def __init__(self, model_cfg, tokenizer=None, options=None):
        super().__init__()
        self.options = options = self.make_options(options)
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

    def attention_mask(self, batch):
        """What both encoders' attention is masked with: the padding mask (B, 1, 1, T) of padded
        rows, else None (every position sees every other)."""
        return batch.get("attn_mask")

    def generator_logits(self, batch):
        """The generator's logits at the chosen positions, (N, V), fp32 for a stable softmax."""
        picked = self.generator(batch["masked_ids"], mask=self.attention_mask(batch),
                                outputs_at=batch["positions"])                 # (N, C_g)
        return self.generator_head(picked, self.generator.tok_emb.weight).float()

    def discriminator_logits(self, ids, attn_mask=None):
        """(B, T) ids -> (B, T) logits of "replaced"."""
        return self.discriminator_head(self.backbone(ids, mask=attn_mask)).float()

    @torch.no_grad()
    def replaced_probabilities(self, input_ids, attn_mask=None):
        """What sample.py --score shows: (B, T) -> (B, T), the discriminator's P(replaced)."""
        return torch.sigmoid(self.discriminator_logits(input_ids, attn_mask))

    def token_scores(self, input_ids):
        """score(): (B, T) framed after <eos> -> (B, T - 1), P(replaced) of every token after it."""
        return self.replaced_probabilities(input_ids)[:, 1:]

    def forward(self, batch, totals=None):
        targets, valid = batch["targets"], batch["valid"]
        logits = self.generator_logits(batch)                                           # (N, V)
        generator_nll = F.cross_entropy(logits, targets, reduction="sum")
        with torch.no_grad():   # no gradient flows through the sampling (ELECTRA's stop_gradient)
            sampled = sample_from_logits(logits, batch["sample_noise"], self.options.generator_temperature)
            corrupted, replaced = self.corrupt(batch, sampled)
        detector_logits = self.discriminator_logits(corrupted, self.attention_mask(batch))  # (B, T)
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

    def explain(self, batch, tokenizer):
        """One row of make_batch's batch, through both networks: what the generator reads (the
        chosen tokens as <mask>, or random, or unchanged), its target (the original there), the
        token it samples (run here as forward runs it, under no_grad, with make_batch's
        sample_noise, so the seed fixes the samples; in the mode the caller left the model in),
        what the discriminator then reads ("reads") and its label at every real token: replaced
        where the sample differs from the original, original where it equals it (forward's
        corrupt). Both encoders' masks are the one forward passes (attention_mask)."""
        from minilm.explain import DASH, Explained, mask_grid, pieces
        with torch.no_grad():
            sampled = sample_from_logits(self.generator_logits(batch), batch["sample_noise"],
                                         self.options.generator_temperature)              # (N,)
            corrupted, replaced = self.corrupt(batch, sampled)                            # (B, T)
        T = batch["input_ids"].shape[1]
        chosen = batch["positions"] < T                       # row 0's chosen: flat index b*T + t, b = 0
        positions, sampled = batch["positions"][chosen].tolist(), sampled[chosen].tolist()
        sample, target = [DASH] * T, [DASH] * T
        originals = batch["input_ids"][0]
        for t, s in zip(positions, sampled):
            sample[t], target[t] = tokenizer.id_to_piece(s), tokenizer.id_to_piece(int(originals[t]))
        valid = batch["valid"][0].tolist()
        label = [("replaced" if r else "original") if v else DASH for r, v in zip(replaced[0].tolist(), valid)]
        reads = pieces(tokenizer, corrupted[0])
        columns = {"reads": reads, "target": target, "generator reads": pieces(tokenizer, batch["masked_ids"][0]),
                   "sample": sample, "label": label}
        n_replaced = int(replaced[0].sum())
        notes = [f"generator sampled at {len(positions)} positions: {n_replaced} replaced, "
                 f"{len(positions) - n_replaced} drew the original (labelled original)",
                 "the discriminator predicts the label at every real token; the generator the target"]
        grid = mask_grid(self.attention_mask(batch), T, T)
        title = "bidirectional self-attention" if self.attention_mask(batch) is None else "self-attention, padding masked"
        masks = {f"generator {title}": (pieces(tokenizer, batch["masked_ids"][0]),) * 2 + (grid,),
                 f"discriminator {title}": (reads, reads, grid)}
        return Explained(columns=columns, masks=masks, notes=notes)

    def metrics(self, sums: dict) -> dict:
        """The discriminator's precision and recall of "replaced", and positive_share, the share of
        tokens that were replaced (what calling every token original scores as its error rate)."""
        if "discriminator/true_positives" not in sums:
            return {}
        true_positives, tokens = float(sums["discriminator/true_positives"]), float(sums["discriminator/targets"])
        out = {"discriminator/precision": true_positives / max(float(sums["discriminator/predicted_positives"]), 1.0),
               "discriminator/recall": true_positives / max(float(sums["discriminator/positives"]), 1.0)}
        if tokens > 0:
            out["discriminator/positive_share"] = float(sums["discriminator/positives"]) / tokens
        return out

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
