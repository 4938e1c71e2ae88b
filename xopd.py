"""
X-OPD: cross-modal on-policy distillation (Cao et al., arXiv 2603.24596), and the
baselines it is compared with (SFT / offline KD, GKD).

Top to bottom: sampling, the student's rollouts, the fused log-prob gather, the teacher's
scores, Eq. 1-5 and one X-OPD step; the baselines; what the pipeline needs beside them. A step
returns its loss and diagnostics; train.py does backward and the update.

The method's equations, numbered in the order the paper's method section introduces them:
  Eq. 1  in-modal advantage     A_im(y_t) = log pi_phi(y_t | T, y<t) - log pi_theta(y_t | T, y<t)
  Eq. 2  cross-modal advantage  A_cm(y_t) = log pi_phi(y_t | T, y<t) - log pi_theta(y_t | S, y<t)
  Eq. 3  importance ratio       r_t = pi_theta(y_t | .) / pi_theta_old(y_t | .)
  Eq. 4  per-term loss          L = -mean_seq( mean_t( r_t * A_t ) )        (A_t detached)
         (loss_agg "token_sum": -sum_seq sum_t r_t * A_t / (n_seq * L_max), L_max fixed)
  Eq. 5  objective              L = lam * L_im + (1 - lam) * L_cm

What Eq. 4's gradient is, exactly: per step, E_{y_t ~ pi}[grad log pi(y_t|y<t) * A_t] =
-grad KL(pi(.|y<t) || pi_phi(.|y<t)) with the prefix y<t held fixed, so in expectation
over rollouts the gradient is -grad of sum_t E_{y<t ~ pi (not differentiated)} KL_t, the
per-step reverse KL. The sequence-level reverse KL KL(pi(y|x) || pi_phi(y|T)) has, in
addition, the terms through the prefix distribution (a reward-to-go sum_{s>=t} A_s in
place of A_t would give them); X-OPD, like on-policy distillation in general, drops them.
"""
import math
import time

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import model as M

# -----------------------------------------------------------------------------
# sampling

def sample_next_token(logits, generator=None, temperature=1.0, top_k=0, top_p=1.0):
    """Draw one token per row from (B, V) logits. Temperature 0 is argmax (log-prob 0, a point
    mass). Otherwise: divide by temperature, keep the top_k tokens (0 = all), then the smallest
    set whose cumulative probability reaches top_p (the top token always stays), renormalise and
    draw. Returns ids (B,) and each id's log-prob under the distribution it was drawn from."""
    if temperature == 0:
        ids = logits.argmax(dim=-1)
        return ids, torch.zeros(ids.shape, dtype=torch.float32, device=logits.device)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    if 0 < top_k < logits.size(-1):
        # keep exactly k by index, so ties at the k-th value do not let more through
        keep = torch.zeros_like(logits, dtype=torch.bool)
        keep.scatter_(-1, logits.topk(top_k, dim=-1).indices, True)
        logits = logits.masked_fill(~keep, -math.inf)
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # token i stays if the mass before it is < p: the smallest prefix reaching p (first stays)
        mass_before = probs.cumsum(dim=-1) - probs
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, -math.inf)
    logp = logits.log_softmax(dim=-1)
    # Inverse CDF: one uniform per row (torch.multinomial draws one per vocabulary entry), the
    # first id whose cumulative probability exceeds it (never one of probability 0); in float64,
    # so that the tail's mass survives the sum.
    cdf = logp.double().exp().cumsum(dim=-1)  # (B, V)
    u = torch.rand(cdf.shape[0], 1, generator=generator, dtype=cdf.dtype, device=cdf.device)
    u = u * cdf[:, -1:]
    ids = torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_(max=cdf.shape[-1] - 1)
    return ids, logp.gather(-1, ids[:, None]).squeeze(-1)


def last_hidden(hidden, lengths):
    """hidden (B, T, d) -> (B, d) at each row's last real position."""
    return hidden[torch.arange(hidden.size(0), device=hidden.device), lengths - 1]


def sample(decoder, lengths, *, input_ids=None, inputs_embeds=None, n=1, max_new_tokens,
           eos_id, temperature=1.0, top_k=0, top_p=1.0, generator=None, step=None):
    """KV-cached rollouts: prefill the right-padded prompts once, repeat the cache n times (row b
    -> rows b*n .. b*n+n-1), decode one token per step. Finished rows keep emitting eos and are
    masked. Returns ids (B*n, L), mask (B*n, L) bool (real positions, up to and including the
    first eos), logprobs (B*n, L) from the sampling logits (float32, or float64 for a float64
    model; 0 where masked). L <= max_new_tokens: the loop stops once every row has ended.
    step(x, cache): the decode step, decoder.decode_step when None (faster ones: tests/bench.py)."""
    static, check_every = getattr(step, "static", False), getattr(step, "check_every", 1)
    with torch.inference_mode():
        B, T = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        cache = decoder.new_cache(B, T if static else T + max_new_tokens)
        hidden = decoder.prefill(cache, lengths, input_ids=input_ids, inputs_embeds=inputs_embeds)
        logits = decoder.logits(last_hidden(hidden, lengths))  # (B, V)
        if not torch.isfinite(logits).all():  # diverged weights: said once, not per token
            raise FloatingPointError("the prompt's logits to sample from are not finite")
        if static or n > 1:  # n samples per prompt without re-encoding the prompt or the audio
            cache = cache.repeat_interleave(n, max_len=T + max_new_tokens if static else None)
        logits = logits.repeat_interleave(n, dim=0)  # (B*n, V)
        done = torch.zeros(B * n, dtype=torch.bool, device=logits.device)
        ids, mask, logprobs = [], [], []
        for t in range(max_new_tokens):
            tok, lp = sample_next_token(logits, generator, temperature, top_k, top_p)
            tok = tok.masked_fill(done, eos_id)
            ids.append(tok)
            mask.append(~done)
            logprobs.append(lp.masked_fill(done, 0.0))
            done = done | (tok == eos_id)
            if t == max_new_tokens - 1 or (t + 1) % check_every == 0 and done.all():
                break
            logits = decoder.logits(decoder.decode(cache, input_ids=tok, step=step))  # (B*n, V)
        L = int(torch.stack(mask).any(1).sum())  # drops steps taken after every row had ended
        out = tuple(torch.stack(x, 1)[:, :L] for x in (ids, mask, logprobs))
    return tuple(x.clone() for x in out)  # inference tensors cannot be saved for backward


# -----------------------------------------------------------------------------
# rollouts: the student reads T as tokens or S as audio vectors

def prompt_embeds(model, batch, modality):
    """The decoder's input for a batch's prompts -> (embeds (B, T, dim), lengths (B,)). A
    model.Decoder (the text teacher) reads the text prompt; a model.SpeechLM the text prompt
    (modality "text") or the speech prompt, its audio encoded from batch.mels, or from the frozen
    encoder's cached outputs batch.feats. No graph is kept through a frozen audio side."""
    if isinstance(model, M.Decoder):
        return model.embed_tokens(batch.text_ids), batch.text_lens
    if modality == "text":
        return model.embed(batch.text_ids, batch.text_lens)
    audio = (*model.encoder.parameters(), *model.adapter.parameters())
    with torch.set_grad_enabled(torch.is_grad_enabled() and any(p.requires_grad for p in audio)):
        audio = (model.encode_audio(batch.mels, batch.mel_lens) if batch.feats is None
                 else model.audio_embeds(batch.feats, batch.feat_lens))
    return model.embed(batch.speech_ids, batch.speech_lens, *audio)


def student_rollouts(student, batch, *, terms=("im", "cm"), n=4, max_new_tokens,
                     temperature=1.0, eos_id, generator=None):
    """The student (a model.SpeechLM) samples n responses per prompt from T (term "im",
    in-modal) and/or hearing S ("cm", cross-modal). Returns prompts {term: (embeds, lens)}
    and rollouts {term: (ids, mask, logp_old)}, rows (B*n, L), as xopd.sample gives them."""
    kw = dict(n=n, max_new_tokens=max_new_tokens, eos_id=eos_id, temperature=temperature,
              generator=generator)
    prompts = {k: prompt_embeds(student, batch, {"im": "text", "cm": "speech"}[k]) for k in terms}
    return prompts, {k: sample(student.decoder, lens, inputs_embeds=emb, **kw)
                     for k, (emb, lens) in prompts.items()}


# -----------------------------------------------------------------------------
# log-probs through the fused gather; the teacher's scores (the first half of Eq. 1 and 2)

class _TokenLogprobs(torch.autograd.Function):  # token_logprobs' forward and backward
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, temperature):
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        w = weight.to(acc)  # no copy for float32 / float64; bf16 accumulates in float32
        out = torch.empty(hidden.size(0), dtype=acc, device=hidden.device)
        lse = torch.empty_like(out)
        for i in range(0, hidden.size(0), chunk_size):
            logits = hidden[i:i + chunk_size].to(acc) @ w.T  # (c, V), the only big tensor
            logits.mul_(1.0 / temperature)  # exact at temperature 1
            out[i:i + chunk_size] = logits.gather(1, targets[i:i + chunk_size, None]).squeeze(1)
            # log-sum-exp in place (torch.logsumexp would allocate a second (c, V) buffer)
            m = logits.amax(dim=-1, keepdim=True)
            lse[i:i + chunk_size] = logits.sub_(m).exp_().sum(-1).log_() + m.squeeze(1)
            del logits  # free this chunk before the next is allocated: one (c, V) buffer at a time
        out -= lse
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk_size, ctx.temperature = chunk_size, temperature
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, targets, lse = ctx.saved_tensors
        acc, c, tau = lse.dtype, ctx.chunk_size, ctx.temperature
        w = weight.to(acc)
        grad_out = grad_out.to(acc) / tau  # d(logits/tau) = d(logits) / tau
        need_h, need_w = ctx.needs_input_grad[:2]
        grad_h = torch.empty(hidden.shape, dtype=acc, device=hidden.device) if need_h else None
        grad_w = torch.zeros_like(w) if need_w else None
        for i in range(0, hidden.size(0), c):
            h = hidden[i:i + c].to(acc)
            g = grad_out[i:i + c]
            # recompute the chunk's probabilities in place: p = exp(logits / tau - lse)
            p = (h @ w.T).mul_(1.0 / tau).sub_(lse[i:i + c, None]).exp_()
            # d out / d logits = onehot(target) - p, scaled by the incoming gradient
            p.mul_(-g[:, None])
            p[torch.arange(p.size(0), device=p.device), targets[i:i + c]] += g
            if need_h:
                grad_h[i:i + c] = p @ w
            if need_w:
                grad_w.addmm_(p.T, h)
            del p
        return (grad_h.to(hidden.dtype) if need_h else None,
                grad_w.to(weight.dtype) if need_w else None, None, None, None)


def token_logprobs(hidden, weight, targets, chunk_size=1024, temperature=1.0):
    """log softmax(hidden @ weight.T / temperature) at targets, never holding more than
    (chunk_size, V) logits; backward recomputes each chunk. hidden (N, d), weight (V, d),
    targets (N,) -> (N,) in float32 (float64 for float64 inputs)."""
    return _TokenLogprobs.apply(hidden, weight, targets, chunk_size, temperature)


def response_hidden(decoder, prompt_embeds, prompt_lens, response_ids):
    """Run prompt + response through the decoder in one causal pass and return the hidden
    states that PREDICT each response token (the position before it): (B, L, dim).
    prompt_embeds (B, T, dim) right padded with prompt_lens (B,); response_ids (B, L)."""
    T, L = prompt_embeds.size(1), response_ids.size(1)
    x = torch.cat([prompt_embeds, decoder.embed_tokens(response_ids)], dim=1)  # (B, T+L, dim)
    # move each response to sit right after its own prompt: row b reads position j from
    # j (prompt part) or T + j - len_b (response part); the tail is padding
    j = torch.arange(T + L, device=x.device)[None]
    lens = prompt_lens[:, None]
    src = torch.where(j < lens, j, (T + j - lens).clamp(max=T + L - 1))  # (B, T+L)
    x = x.gather(1, src[..., None].expand(-1, -1, x.size(-1)))
    hidden = decoder(inputs_embeds=x)  # (B, T+L, dim); causal, so padding never leaks back
    pos = lens - 1 + torch.arange(L, device=x.device)[None]  # (B, L)
    return hidden.gather(1, pos[..., None].expand(-1, -1, hidden.size(-1)))


def sequence_logprobs(decoder, prompt_embeds, prompt_lens, ids, mask, chunk_size=1024,
                      temperature=1.0):
    """Log-prob of each response token (B, L), 0 where mask is False, via the fused gather."""
    h = response_hidden(decoder, prompt_embeds, prompt_lens, ids)
    out = torch.zeros(ids.shape, dtype=torch.float32, device=ids.device)
    lp = token_logprobs(h[mask], decoder.lm_head.weight, ids[mask], chunk_size, temperature)
    return out.masked_scatter(mask, lp.float())


@torch.no_grad()
def teacher_logprobs(teacher, batch, rollouts, *, n, temperature=1.0, chunk_size=1024):
    """The teacher (a model.Decoder) scores each sampled token on T + response: {term: (B*n, L)}."""
    text_lens = batch.text_lens.repeat_interleave(n)
    prompt = prompt_embeds(teacher, batch, "text")[0].repeat_interleave(n, dim=0)
    return {k: sequence_logprobs(teacher, prompt, text_lens, ids, mask, chunk_size, temperature)
            for k, (ids, mask, _) in rollouts.items()}


# -----------------------------------------------------------------------------
# the X-OPD loss: Eq. 1-5

def pg_term(logp, logp_old, logp_teacher, mask, ratio_clip=0.0, agg="seq_mean", norm_len=None):
    """One X-OPD term (Eq. 1-4). logp: the student's log-probs of the sampled tokens, with grad;
    logp_old: the same at sampling time; logp_teacher: the teacher's. All (B, L). agg, norm_len:
    Eq. 4's reduction (aggregate). Returns (loss, mean advantage per real token). The advantage
    uses the recomputed log-probs, which take the teacher's code path: a teacher equal to the
    student gives exactly 0, not the KV cache's rounding noise."""
    adv = (logp_teacher - logp).detach()  # Eq. 1 / Eq. 2, a reward: no gradient through it
    ratio = torch.exp(logp - logp_old)  # Eq. 3, 1 in value on-policy; its gradient is grad log pi
    obj = ratio * adv
    if ratio_clip > 0:  # PPO-style pessimistic clip; off in the paper (pure on-policy)
        obj = torch.minimum(obj, ratio.clamp(1 - ratio_clip, 1 + ratio_clip) * adv)
    loss = -aggregate(obj, mask, agg, norm_len)  # Eq. 4
    return loss, adv[mask].mean()


LOSS_AGGS = ("seq_mean", "token_sum")


def aggregate(x, mask, agg="seq_mean", norm_len=None):
    """Eq. 4's reduction of per-token terms x (B, L) over the real tokens (mask) to one number.
    "seq_mean" (the paper): each sequence's mean over its tokens, then the mean over sequences, so
    a token of a short answer weighs more than one of a long answer. "token_sum": the sum over
    every real token divided by B * norm_len (norm_len: the longest possible response), so every
    token weighs the same (the "length-unbiased" form of Dr. GRPO, arXiv 2503.20783)."""
    if agg == "seq_mean":
        return _seq_mean(x, mask)
    if agg == "token_sum":
        return (x * mask.to(x.dtype)).sum() / (x.size(0) * norm_len)
    raise ValueError(f"loss aggregation: expected one of {', '.join(LOSS_AGGS)}, got {agg!r}")


def _seq_mean(x, mask):
    """Mean over each row's real tokens, then over rows."""
    m = mask.to(x.dtype)
    return ((x * m).sum(1) / m.sum(1).clamp(min=1)).mean()


def sampled_rkl(logp, logp_teacher, mask):
    """The per-token reverse-KL estimate log pi_theta - log pi_phi on sampled tokens (B, L), 0
    where mask is False; its sum over a row estimates KL(pi_theta(y|.) || pi_phi(y|T))."""
    return (logp - logp_teacher) * mask


def xopd_loss(im=None, cm=None, lam=0.5, ratio_clip=0.0, agg="seq_mean", norm_len=None):
    """Eq. 5: L = lam * L_im + (1 - lam) * L_cm. im, cm: (logp, logp_old, logp_teacher, mask),
    each (B, L), for rollouts from T and from S; None when the term's weight is 0. Returns (loss,
    stats): per term the mean advantage adv_* (minus a per-token reverse-KL estimate) and rkl_*,
    mean_rows(sum_t -A_t), unbiased for the sequence-level KL(pi_theta(y|.) || pi_phi(y|T))."""
    loss, stats = 0.0, {}
    for name, term, w in (("im", im, lam), ("cm", cm, 1.0 - lam)):
        if term is None:
            assert w == 0, f"the {name} term has weight {w} but no rollouts"
            continue
        logp, logp_old, logp_teacher, mask = term
        term_loss, adv = pg_term(logp, logp_old, logp_teacher, mask, ratio_clip, agg, norm_len)
        loss = loss + w * term_loss  # Eq. 5
        stats[f"adv_{name}"] = adv.item()
        stats[f"rkl_{name}"] = sampled_rkl(logp.detach(), logp_teacher, mask).sum(1).mean().item()
    return loss, stats


def _check_vocab(student, teacher):  # the models' side of check_same_tokenizer
    vs, vt = student.decoder.lm_head.weight.size(0), teacher.lm_head.weight.size(0)
    if vs != vt:
        raise ValueError(f"student vocabulary {vs} != teacher vocabulary {vt}: "
                         "they must share one tokenizer")


def _lap(t0):
    """-> (ms since t0, now): a step's phases timed back to back."""
    now = time.perf_counter()
    return (now - t0) * 1e3, now


def xopd_step(student, teacher, batch, *, n=4, lam=0.5, max_new_tokens, temperature=1.0,
              eos_id, generator=None, ratio_clip=0.0, loss_agg="seq_mean", chunk_size=1024):
    """The X-OPD loss of a batch of paired prompts (S, T) -> (loss, stats). The student (a
    model.SpeechLM) samples n responses from T (in-modal) and n from S (cross-modal); the frozen
    teacher (a model.Decoder) scores both on T + response; the student's log-probs are recomputed
    with grad; Eq. 5. `temperature` scales the rollouts' and both models' log-probs alike; no
    top-k / top-p, whose cut tail would be missing from the KL's estimate. loss_agg: aggregate."""
    assert temperature > 0, "training rollouts must be stochastic"
    _check_vocab(student, teacher)
    t0 = time.perf_counter()
    terms = tuple(k for k, w in (("im", lam), ("cm", 1.0 - lam)) if w > 0)  # weight 0: no rollouts
    prompts, rollouts = student_rollouts(student, batch, terms=terms, n=n,
                                         max_new_tokens=max_new_tokens, temperature=temperature,
                                         eos_id=eos_id, generator=generator)
    t_rollout, t0 = _lap(t0)
    teacher_lp = teacher_logprobs(teacher, batch, rollouts, n=n, temperature=temperature,
                                  chunk_size=chunk_size)
    t_teacher, t0 = _lap(t0)
    scored = {}
    for k, (ids, mask, logp_old) in rollouts.items():
        emb, lens = prompts[k]
        logp = sequence_logprobs(student.decoder, emb.repeat_interleave(n, dim=0),
                                 lens.repeat_interleave(n), ids, mask, chunk_size, temperature)
        scored[k] = (logp, logp_old, teacher_lp[k], mask)
    loss, stats = xopd_loss(scored.get("im"), scored.get("cm"), lam, ratio_clip, loss_agg,
                            max_new_tokens)
    lens = torch.cat([m.sum(1) for _, m, _ in rollouts.values()])
    ended = torch.cat([((ids == eos_id) & m).any(1) for ids, m, _ in rollouts.values()])
    return loss, dict(**stats, resp_len=lens.float().mean().item(), tokens=int(lens.sum()),
                      frac_ended=ended.float().mean().item(), ms_rollout=t_rollout,
                      ms_teacher=t_teacher, ms_loss=_lap(t0)[0])


# -----------------------------------------------------------------------------
# the baselines: GKD and SFT (offline KD is SFT on the teacher's answers)

def gkd_divergence(student_logits, teacher_logits, beta=0.5, temperature=1.0):
    """Generalised JSD(beta) per row between next-token distributions (..., V) -> (...): beta = 0
    is KL(teacher || student) (forward), beta = 1 KL(student || teacher) (reverse), in between
    beta * KL(teacher || M) + (1 - beta) * KL(student || M), M = beta * teacher + (1 - beta) *
    student (Agarwal et al. 2024, Eq. 1; TRL's convention). The endpoints are the KLs themselves."""
    ls = F.log_softmax(student_logits.float() / temperature, dim=-1)
    lt = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if beta == 0:
        return (lt.exp() * (lt - ls)).sum(-1)
    if beta == 1:
        return (ls.exp() * (ls - lt)).sum(-1)
    lm = torch.logaddexp(lt + math.log(beta), ls + math.log1p(-beta))  # log M
    return beta * (lt.exp() * (lt - lm)).sum(-1) + (1 - beta) * (ls.exp() * (ls - lm)).sum(-1)


def _gkd_chunk(hs, ws, ht, wt, beta, temperature):
    return gkd_divergence(hs.float() @ ws.float().T, ht.float() @ wt.float().T, beta, temperature)


def gkd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, beta=0.5,
             temperature=1.0, chunk_size=1024):
    """Generalised JSD(beta) per position (N,) between the student's and the teacher's full
    next-token distributions, from hidden states (N, d_s), (N, d_t) and heads (V, d_s), (V, d_t).
    Chunk by chunk under activation checkpointing (autograd gets the gradient right): a chunk's
    two (c, V) logits exist only while it is computed, and again in its backward."""
    out = [checkpoint(_gkd_chunk, student_hidden[i:i + chunk_size], student_weight,
                      teacher_hidden[i:i + chunk_size], teacher_weight, beta, temperature,
                      use_reentrant=False) for i in range(0, student_hidden.size(0), chunk_size)]
    return torch.cat(out) if out else student_hidden.new_zeros(0, dtype=torch.float32)


def _fixed_responses(batch):  # -> ids (B, L), mask (B, L)
    return batch.response_ids, M.lengths_mask(batch.response_lens, batch.response_ids.size(1))


def gkd_step(student, teacher, batch, *, beta=0.0, student_frac=0.5, max_new_tokens,
             temperature=1.0, eos_id, pad_id=None, generator=None, chunk_size=1024):
    """The GKD loss (the paper's baseline: forward KL, beta = 0): each row's response is, with
    probability student_frac, sampled from the student hearing S, otherwise the fixed batch
    response; the loss is the full-vocabulary divergence between the student (S + response) and
    the teacher (T + response), mean over real tokens. Returns (loss, stats)."""
    _check_vocab(student, teacher)
    t0 = time.perf_counter()
    emb, lens = prompt_embeds(student, batch, "speech")
    ids, mask = _fixed_responses(batch)
    g_dev = generator.device if generator is not None else None  # drawn where the generator is
    draw = torch.rand(ids.size(0), generator=generator, device=g_dev)
    on_policy = (draw < student_frac).to(ids.device)
    if on_policy.any():
        s_ids, s_mask, _ = sample(student.decoder, lens[on_policy], inputs_embeds=emb[on_policy],
                                  max_new_tokens=max_new_tokens, eos_id=eos_id,
                                  temperature=temperature, generator=generator)
        pad = eos_id if pad_id is None else pad_id  # a valid id: masked positions still embed
        L = max(ids.size(1), s_ids.size(1))
        widen = lambda t, value=0: F.pad(t, (0, L - t.size(1)), value=value)  # (B', L)
        ids, mask = widen(ids, pad), widen(mask)
        ids[on_policy], mask[on_policy] = widen(s_ids, pad), widen(s_mask)
    t_rollout, t0 = _lap(t0)
    with torch.no_grad():
        ht = response_hidden(teacher, *prompt_embeds(teacher, batch, "text"), ids)[mask]
    hs = response_hidden(student.decoder, emb, lens, ids)[mask]
    loss = gkd_loss(hs, student.decoder.lm_head.weight, ht, teacher.lm_head.weight, beta,
                    temperature, chunk_size).mean()
    return loss, dict(frac_student=on_policy.float().mean().item(), tokens=int(mask.sum()),
                      resp_len=mask.sum(1).float().mean().item(), ms_rollout=t_rollout,
                      ms_loss=_lap(t0)[0])


def sft_loss(hidden, weight, targets, mask, chunk_size=1024, per_sequence=False):
    """Masked cross-entropy, mean over real response tokens. hidden (B, L, d), targets/mask (B, L).
    per_sequence: mean over each row's tokens, then over rows, so every example weighs the same
    whatever its length (a two-token answer as much as a sentence-long transcript)."""
    lp = token_logprobs(hidden[mask], weight, targets[mask], chunk_size)
    if per_sequence:
        per_token = torch.zeros(mask.shape, dtype=lp.dtype, device=lp.device)
        return -_seq_mean(per_token.masked_scatter(mask, lp), mask)
    return -lp.mean()


def sft_step(student, batch, *, chunk_size=1024):
    """The SFT loss: cross-entropy of the batch's fixed responses given the speech prompt S."""
    t0 = time.perf_counter()
    loss, n_tokens = response_nll(student, batch, "speech", chunk_size)
    return loss, dict(tokens=n_tokens, ms_loss=_lap(t0)[0])


# -----------------------------------------------------------------------------
# what the pipeline needs beside the steps: validation loss, greedy answers, held-out reverse KL

def response_nll(model, batch, modality, chunk_size=1024, per_sequence=False):
    """Mean cross-entropy of the batch's fixed responses given its text or speech prompts (per
    token, or per_sequence: see sft_loss) -> (loss, number of response tokens)."""
    emb, lens = prompt_embeds(model, batch, modality)
    dec = model if isinstance(model, M.Decoder) else model.decoder
    ids, mask = _fixed_responses(batch)
    h = response_hidden(dec, emb, lens, ids)  # (B, L, dim)
    return sft_loss(h, dec.lm_head.weight, ids, mask, chunk_size, per_sequence), int(mask.sum())


@torch.no_grad()
def generate(model, world, recs, modality, device, max_new_tokens, batch_size=64, encoder=None):
    """Greedy answers (temperature 0) to recs, from the text or the speech prompt (with a frozen
    encoder given, from its cached outputs)."""
    dec = model if isinstance(model, M.Decoder) else model.decoder
    outs = []
    for i in range(0, len(recs), batch_size):
        b = world.batch(recs[i:i + batch_size], device=device, text=modality == "text",
                        speech=modality == "speech", encoder=encoder)
        embeds, lens = prompt_embeds(model, b, modality)
        ids, _, _ = sample(dec, lens, inputs_embeds=embeds, max_new_tokens=max_new_tokens,
                           eos_id=world.end_id, temperature=0.0)
        outs += [world.decode(row) for row in ids.tolist()]
    return outs


@torch.no_grad()
def reverse_kl(student, teacher, batch, *, n=1, max_new_tokens, eos_id, generator=None):
    """Monte Carlo estimates of the sequence-level reverse KL from the student reading T
    ("rkl_im") and hearing S ("rkl_cm") to the teacher reading T, in nats per response (sampled_rkl
    summed over a row, mean over rows): on held-out prompts, what alignment does to the gap."""
    _check_vocab(student, teacher)
    _, rollouts = student_rollouts(student, batch, n=n, max_new_tokens=max_new_tokens,
                                   eos_id=eos_id, generator=generator)
    teacher_lp = teacher_logprobs(teacher, batch, rollouts, n=n)
    return {f"rkl_{k}": sampled_rkl(lp, teacher_lp[k], mask).sum(1).mean().item()
            for k, (_, mask, lp) in rollouts.items()}


def check_same_tokenizer(teacher_tok, student_tok):
    """Teacher and student must share one tokenizer: same vocabulary, same special tokens."""
    va, vb = (tok.get_vocab(with_added_tokens=True) for tok in (teacher_tok, student_tok))
    problems = []
    if va != vb:
        diff = sorted(set(va.items()) ^ set(vb.items()))
        problems.append(f"vocabularies differ (sizes {len(va)} vs {len(vb)}; e.g. {diff[:5]})")
    sa, sb = ({i: t.content for i, t in tok.get_added_tokens_decoder().items() if t.special}
              for tok in (teacher_tok, student_tok))
    if sa != sb:
        problems.append(f"special tokens differ: teacher {sa} vs student {sb}")
    if problems:
        raise ValueError("teacher and student tokenizers differ, so the teacher cannot score "
                         "the student's tokens: " + "; ".join(problems))
