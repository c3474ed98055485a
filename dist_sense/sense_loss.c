/* The sense loss of losses.py, forward and backward fused into one pass over the labelled positions.
 *
 * For each position whose target is >= 0 and whose token has a dictionary row, the state is
 * scored against that row's senses (masked, over the temperature), and the cross-entropy to
 * the target (or the KL divergence to the soft top-k targets) is taken. *loss receives their
 * mean times loss_scale; grad receives the gradient of that w.r.t. each state (zeros for
 * unlabelled positions; grad may be NULL when no gradient is wanted). The senses of a position are read
 * once, from cache, for both the logits and the gradient, and nothing of size positions x K x D
 * is materialised: that gather dominated the batched torch version at a demo-sized batch.
 *
 * Arrays are contiguous: states [positions, width], ids/targets [positions] (int64),
 * centres [rows, k_max, depth] (depth = width, or width + 1 for the l2 table), mask [rows, k_max]
 * (bool bytes), token_to_row [vocab], soft_ids/soft_probs [positions, soft_k] or NULL.
 * counts receives (labelled positions, top-1 agreements, top-5 agreements).
 * Returns 0, or a negative code: ERR_MEMORY, ERR_TARGET - position (target >= k_max),
 * ERR_SOFT_ID - position (a soft id >= k_max).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define SIM_DOT 0
#define SIM_COS 1
#define SIM_L2 2
#define TOP_K 5
#define PARALLEL_MIN_POSITIONS 64 /* below this, waking a second thread costs more than it saves */
#define ERR_MEMORY (-1)
#define ERR_TARGET (-((int64_t)1 << 40))
#define ERR_SOFT_ID (-((int64_t)2 << 40))
#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)

#define REAL float
#define NAME sense_loss_f32
#define EXP expf
#define LOG logf
#include "sense_loss_body.h"
#undef REAL
#undef NAME
#undef EXP
#undef LOG

#define REAL double
#define NAME sense_loss_f64
#define EXP exp
#define LOG log
#include "sense_loss_body.h"
