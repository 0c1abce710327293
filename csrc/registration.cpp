// Every op schema of mptkernels, in one place.
//
// Three namespaces share these schemas (one string per op, so they cannot drift):
//   mptkernels::<op>       the public op: what torch.compile, autograd and users see. Its CPU and
//                          CUDA kernels are Python functions made by mptkernels/_dispatch.py from
//                          the dispatch table: they choose an implementation and call it.
//   mptkernels_cpu::<op>   the C++ CPU kernel of the op (csrc/cpu/<family>.cpp). Every op has one.
//   mptkernels_cuda::<op>  the CUDA C++ kernel (csrc/cuda/<family>.cu), for the ops listed below.
// So an op's C++ implementations are found by name (an op defined in mptkernels_cuda has a CUDA
// C++ kernel; built where _C was compiled with CUDA), and the Python table does not repeat them.
//
// Conventions shared by all norm ops (x is 2-D (rows, cols), the Python layer flattens):
//   weight/bias: (cols,) in x's dtype or float32; mean/rstd: (rows,) float32 (float64 for
//   float64 x); an absent optional output is returned as an empty (0,) tensor.
// Arguments are checked once, in Python (mptkernels/ops/<family>.py) before any implementation
// runs; the kernels trust them.
#include <torch/library.h>

// y = norm(s) * (weight + weight_offset) + bias, s = x (+ residual, summed in fp32 and rounded
// to x's dtype). Returns (y, residual_out = s or empty, mean or empty, rstd). rms_norm: no mean
// subtraction. cast_before_weight: round norm(s) to x's dtype before the weight multiply
// (Llama's RMSNorm). weight_offset = 1 gives Gemma's (1 + w).
#define MPTK_SCHEMA_layer_norm_fwd                                                        \
  "(Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, float eps, bool rms_norm, " \
  "float weight_offset, bool cast_before_weight) -> (Tensor, Tensor, Tensor, Tensor)"
// Gradient of layer_norm_fwd. s is the normalised input saved by the forward (residual_out when
// a residual was given, else x); dresidual_out, if given, is the gradient arriving through
// residual_out and is added to dx. Returns (dx, dweight or empty, dbias or empty); dweight/dbias
// in weight's dtype.
#define MPTK_SCHEMA_layer_norm_bwd                                                        \
  "(Tensor dy, Tensor? dresidual_out, Tensor s, Tensor? weight, Tensor? bias, "           \
  "Tensor mean, Tensor rstd, bool rms_norm, float weight_offset, bool cast_before_weight" \
  ") -> (Tensor, Tensor, Tensor)"
// Rotary embedding of x (batch, seqlen, heads, head_dim), stride(-1) == 1, other strides free.
// cos/sin: (max_seqlen, rotary_dim/2) float32 contiguous; token t of sequence b uses row
// t + (seqlen_offsets[b] if given, else seqlen_offset). The first rotary_dim features rotate
// (halves, or pairs when interleaved); the rest are copied. conjugate negates sin (the
// backward). Returns a new contiguous tensor.
#define MPTK_SCHEMA_apply_rotary                                                                \
  "(Tensor x, Tensor cos, Tensor sin, Tensor? seqlen_offsets, int seqlen_offset, bool interleaved, " \
  "bool conjugate) -> Tensor"
// Attention of q (B, Sq, Hq, D) over k, v (B, Sk, Hk, D), Hq % Hk == 0 (GQA), all contiguous.
// Query i sits at key position i + Sk - Sq (bottom-right aligned); rel(i, j) = j - i - (Sk - Sq).
// score(i, j) = c(softmax_scale * q_i . k_j) - slope[b?, h] * |rel| with c(s) = softcap *
// tanh(s / softcap) when softcap > 0 (else c(s) = s); alibi_slopes (Hq,) or (B, Hq) float32, or
// None. Key j is visible to query i iff -window_left <= rel <= window_right (-1: unbounded on
// that side; causal sets window_right = 0). Returns (out (B, Sq, Hq, D) in q's dtype, lse
// (B, Hq, Sq) float32: the log-sum-exp of each row's visible scores, -inf and out = 0 for a
// row that sees no key).
#define MPTK_SCHEMA_attention_fwd                                                          \
  "(Tensor q, Tensor k, Tensor v, Tensor? alibi_slopes, float softmax_scale, bool causal, " \
  "int window_left=-1, int window_right=-1, float softcap=0.0) -> (Tensor, Tensor)"
// Gradient of attention_fwd from dout (B, Sq, Hq, D), dlse (B, Hq, Sq) float32 or None (the
// gradient reaching the returned lse) and the forward's out and lse: (dq, dk, dv) in the
// inputs' dtypes; dk, dv sum over the q heads sharing a kv head.
#define MPTK_SCHEMA_attention_bwd                                                                     \
  "(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? alibi_slopes, "        \
  "float softmax_scale, bool causal, int window_left=-1, int window_right=-1, float softcap=0.0, "    \
  "Tensor? dlse=None) -> (Tensor, Tensor, Tensor)"
// attention_fwd over packed sequences: q (total_q, Hq, D), k and v (total_k, Hk, D); sequence b
// is rows [cu_seqlens_q[b], cu_seqlens_q[b+1]) of q and the same of k/v by cu_seqlens_k (int32
// (B + 1,), from 0); max_seqlen_* bound every length. alibi_slopes (Hq,) or (B, Hq). Returns
// (out (total_q, Hq, D), lse (Hq, total_q) float32); rows after cu_seqlens_q[-1] get out = 0
// and lse = -inf. The backward's dlse is (Hq, total_q) or None.
#define MPTK_SCHEMA_attention_varlen_fwd                                                    \
  "(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "               \
  "int max_seqlen_q, int max_seqlen_k, Tensor? alibi_slopes, float softmax_scale, bool causal, " \
  "int window_left=-1, int window_right=-1, float softcap=0.0) -> (Tensor, Tensor)"
#define MPTK_SCHEMA_attention_varlen_bwd                                                              \
  "(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "                              \
  "Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, Tensor? alibi_slopes, " \
  "float softmax_scale, bool causal, int window_left=-1, int window_right=-1, float softcap=0.0, "    \
  "Tensor? dlse=None) -> (Tensor, Tensor, Tensor)"
// Decoding with a KV cache (flash-attn's flash_attn_with_kvcache). Caches: k_cache, v_cache
// (B_cache, max_seqlen, Hk, D) contiguous, sequence b in batch row cache_batch_idx[b] (int32
// (B,), or b when None); or paged: (num_blocks, block_size, Hk, D) with block_table int32
// (B, max_blocks), logical row r of sequence b at [block_table[b][r / block_size], r %
// block_size]. Sequence b's cache is its rows [cache_leftpad[b] (int32 (B,), or 0),
// cache_seqlens[b]). With rotary_cos/rotary_sin (float32 (seqlen_ro, rotary_dim / 2)), new k
// token t is rotated to position cache_seqlens[b] + t and so is q's token t when causal or
// windowed (else all of q to cache_seqlens[b]); rotary_interleaved: GPT-J pairs. k, v
// (B, Sn, Hk, D), if given, are then written in place into rows [cache_seqlens[b], + Sn), and q
// (B, Sq, Hq, D) attends to rows [cache_leftpad[b], cache_seqlens[b] + Sn) as attention_fwd
// over those keys. cache_seqlens (B,) int32 is not modified. Returns (out, lse (B, Hq, Sq)).
#define MPTK_SCHEMA_attention_with_kvcache                                                           \
  "(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor cache_seqlens, Tensor? k, Tensor? v, "   \
  "Tensor? alibi_slopes, float softmax_scale, bool causal, int window_left=-1, int window_right=-1, " \
  "float softcap=0.0, Tensor? rotary_cos=None, Tensor? rotary_sin=None, bool rotary_interleaved=False, " \
  "Tensor? cache_batch_idx=None, Tensor? cache_leftpad=None, Tensor? block_table=None) -> (Tensor, Tensor)"
// ---- GEMM family. x is 2-D (M, K) (the Python layer flattens leading dims); weights are (N, K)
// like nn.Linear's; activation is "none", "relu", "gelu" (exact erf) or "gelu_tanh".
// out = act(x @ weight^T + bias) in x's dtype (fp32 accumulation). preact = x @ weight^T + bias
// in x's dtype, kept for the backward of the gelus; an empty (0,) tensor otherwise.
#define MPTK_SCHEMA_linear_fwd "(Tensor x, Tensor weight, Tensor? bias, str activation) -> (Tensor, Tensor)"
// Gradient of linear_fwd: saved = preact for the gelus, out for relu, unused for none. Returns
// (dx, dweight, dbias (float32; float64 for float64 x) or an empty (0,) tensor when has_bias
// is false).
#define MPTK_SCHEMA_linear_bwd \
  "(Tensor dout, Tensor x, Tensor weight, Tensor saved, str activation, bool has_bias) -> (Tensor, Tensor, Tensor)"
// Symmetric per-row int8 quantisation of x (M, K): scale = absmax / 127 (float32 (M,); an
// all-zero row gets 1), q = round-half-even(x / scale) clamped to [-127, 127].
#define MPTK_SCHEMA_quantize_rowwise "(Tensor x) -> (Tensor, Tensor)"
// Exact int8 GEMM core: a (M, K) int8, b (N, K) int8 -> a @ b^T as int32 (M, N).
#define MPTK_SCHEMA_int8_mm "(Tensor a, Tensor b) -> Tensor"
// W8A8: x (M, K) float quantised per row, times w_int8 (N, K) in int8 with int32 accumulation;
// out = act(acc * x_scale[m] * w_scale[n] + bias[n]) in x's dtype.
#define MPTK_SCHEMA_int8_linear "(Tensor x, Tensor w_int8, Tensor w_scale, Tensor? bias, str activation) -> Tensor"
// Weight-only int8: out = x @ (w_int8 * w_scale[:, None])^T + bias, x's dtype, the weight
// dequantised on the fly (never materialised in full).
#define MPTK_SCHEMA_weight_only_int8_linear "(Tensor x, Tensor w_int8, Tensor w_scale, Tensor? bias) -> Tensor"

// ---- GLU family (SwiGLU, GeGLU). gate, up: (rows, N) of one float dtype, unit stride along N, any
// row stride (the Python layer flattens leading dims); activation is "silu" (SwiGLU), "gelu"
// (exact erf, GeGLU) or "gelu_tanh". out = act(gate) * up, fp32 maths (fp64 for fp64), a new
// contiguous (rows, N) tensor in gate's dtype.
#define MPTK_SCHEMA_glu_fwd "(Tensor gate, Tensor up, str activation) -> Tensor"
// Gradient of glu_fwd from dout (rows, N), recomputing act(gate) (the forward saves only its
// inputs): (dgate = dout * up * act'(gate), dup = dout * act(gate)), new contiguous tensors.
#define MPTK_SCHEMA_glu_bwd "(Tensor dout, Tensor gate, Tensor up, str activation) -> (Tensor, Tensor)"
// ---- cross_entropy family. x (N, H) (the Python layer flattens leading dims), weight (V, H) in
// x's dtype, target (N,) int64, bias (V,) in x's dtype or None. Row i's logits z = x_i @ W^T
// + bias, s = c * tanh(z / c) when logit_softcap c > 0 (else s = z), lse = logsumexp(s);
// loss_i = lse - (1 - eps) s[t_i] - eps / V * sum_j s_j + z_loss * lse^2 (eps = label_smoothing),
// 0 for t_i == ignore_index; any other target outside [0, V) is an error. reduction: "mean"
// (over the rows not ignored; none: NaN as F.cross_entropy), "sum" or "none" ((N,) losses). The
// logits are computed chunk_rows rows at a time and never exist whole. Returns (loss: float32,
// float64 for float64 x, () or (N,); then, as output_mask = (dx, dweight, dbias) asks, the
// gradients of the returned loss (of its sum for "none") in x's / weight's / bias's dtype,
// computed in the same pass; empty (0,) tensors for those not asked (dbias without bias too)).
#define MPTK_SCHEMA_linear_cross_entropy_fwd                                                           \
  "(Tensor x, Tensor weight, Tensor target, Tensor? bias, int ignore_index, str reduction, "          \
  "float label_smoothing, float logit_softcap, float z_loss, bool[3] output_mask, int chunk_rows) "   \
  "-> (Tensor, Tensor, Tensor, Tensor)"
// Gradient of linear_cross_entropy_fwd from grad_loss (the loss's shape). "mean"/"sum": the
// forward's dx, dweight, dbias times the scalar grad_loss (one passed empty, not computed by the
// forward, is computed by running the chunks again); "none": the chunks run again with row i's
// dlogits scaled by grad_loss[i] (dx, dweight, dbias unused). Returns (dx, dweight, dbias) as
// output_mask asks, empty (0,) tensors otherwise.
#define MPTK_SCHEMA_linear_cross_entropy_bwd                                                           \
  "(Tensor grad_loss, Tensor x, Tensor weight, Tensor target, Tensor? bias, Tensor dx, Tensor dweight, " \
  "Tensor dbias, int ignore_index, str reduction, float label_smoothing, float logit_softcap, "       \
  "float z_loss, bool[3] output_mask, int chunk_rows) -> (Tensor, Tensor, Tensor)"

#define MPTK_DEF(m, op) m.def(#op MPTK_SCHEMA_##op)

// every op: the public one and its C++ CPU kernel
#define MPTK_ALL_OPS(m)                    \
  MPTK_DEF(m, layer_norm_fwd);             \
  MPTK_DEF(m, layer_norm_bwd);             \
  MPTK_DEF(m, apply_rotary);               \
  MPTK_DEF(m, attention_fwd);              \
  MPTK_DEF(m, attention_bwd);              \
  MPTK_DEF(m, attention_varlen_fwd);       \
  MPTK_DEF(m, attention_varlen_bwd);       \
  MPTK_DEF(m, attention_with_kvcache);     \
  MPTK_DEF(m, linear_fwd);                 \
  MPTK_DEF(m, linear_bwd);                 \
  MPTK_DEF(m, quantize_rowwise);           \
  MPTK_DEF(m, int8_mm);                    \
  MPTK_DEF(m, int8_linear);                \
  MPTK_DEF(m, weight_only_int8_linear);    \
  MPTK_DEF(m, glu_fwd);                    \
  MPTK_DEF(m, glu_bwd);                    \
  MPTK_DEF(m, linear_cross_entropy_fwd);   \
  MPTK_DEF(m, linear_cross_entropy_bwd)

TORCH_LIBRARY(mptkernels, m) { MPTK_ALL_OPS(m); }
TORCH_LIBRARY(mptkernels_cpu, m) { MPTK_ALL_OPS(m); }

// The ops with a CUDA C++ kernel (csrc/cuda/): defined whether or not this build compiled CUDA,
// so the list of implementations is the same everywhere; mptkernels.info() says what was built.
TORCH_LIBRARY(mptkernels_cuda, m) {
  MPTK_DEF(m, layer_norm_fwd);
  MPTK_DEF(m, layer_norm_bwd);
  MPTK_DEF(m, apply_rotary);
  MPTK_DEF(m, quantize_rowwise);
}
