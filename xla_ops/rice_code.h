// Rice codes of the quantized vectors (jaxjpeg.quantized_vectors, host
// only): a value v >= 0 on parameter k is its quotient v >> k in unary (that
// many 1 bits, then a 0) and its k low bits; each stream is written most
// significant bit first. The unary parts run on from one call to the next
// (a block of codes at a time), their last bits pending; remainders end a
// call padded with 0 bits (every block but the last holds a multiple of 8
// values, so the blocks' remainders join as one stream).
#ifndef JAXJPEG_RICE_CODE_H_
#define JAXJPEG_RICE_CODE_H_

#include <cstdint>
#include <vector>

namespace jaxjpeg {

// Bits pending at the end of a unary stream: `count` (< 8) of them in the
// low bits of `bits`, the first written the most significant.
struct PendingBits {
  uint32_t bits = 0;
  int count = 0;
};

// Appends to `out` the whole bytes of `pending` followed by the unary parts
// of `quotients` (each >= 0); the bits past the last whole byte are left in
// `pending`.
void AppendUnary(const int64_t* quotients, int64_t n, PendingBits& pending,
                 std::vector<uint8_t>& out);

// Appends to `out` the `k` (1..62) low bits of each of `values`, then 0
// bits to the next byte.
void AppendRemainders(const int64_t* values, int64_t n, int k, std::vector<uint8_t>& out);

// The widest Rice parameter the counts and codes take.
constexpr int kMaxRiceWidth = 62;

// The bytes `values` (n) take quantized on `step` (codes rounded half to
// even) about `center`, folded to >= 0 and Rice coded on their best
// parameter in 0..max_rice (<= kMaxRiceWidth; unary parts and remainders
// each padded to a byte: jaxjpeg.quantized_vectors.coded_bytes), with the
// sum of the values' squared rounding errors, each times `weights[i]`
// where given, in `sse`; -1 where a code reaches 2^52 (not counted).
// `folded`: scratch of n values.
int64_t RiceStepBytes(const double* values, const double* weights, int64_t n, double step,
                      int64_t center, int max_rice, double& sse, int64_t* folded);

// RiceStepBytes of `values` (n) on each of `count` positive finite `steps`
// about its `centers[i]` into `nbytes` (-1 also where the center is not
// within 2^52) and `sse`. The same figures, fewer divisions: steps whose
// mantissas repeat (a ladder of steps a quarter octave apart) scale one
// division's quotients by powers of two, which is exact. `allow_avx2`:
// AVX2 code where the CPU has it (the same bits).
void RiceStepRates(const double* values, const double* weights, int64_t n,
                   const double* steps, const int64_t* centers, int64_t count, int max_rice,
                   int64_t* nbytes, double* sse, bool allow_avx2 = true);

// The remainder width in 0..max_rice that codes `folded` (n, each >= 0) in
// the fewest bits: quantized_vectors._rice_parameter's walk from the mean's
// width (the mean taken exactly here; numpy's float64 mean is the same while
// the codes' sum is under 2^53, and a start that differs can only land on
// another width of equal cost).
int BestRiceParameter(const int64_t* folded, int64_t n, int max_rice);   // max_rice <= 62

// What quantized_vectors counts of one step's codes (folded as `_zigzag`
// about a center).
struct StepCounts {
  int64_t lo, hi;      // the codes' extremes
  int64_t largest;     // the largest folded code
  int64_t quotients;   // the sum of folded codes >> k, wrapping past 2^63
};

// The codes of transformed values `x` (n) on `step`: x / step rounded half
// to even, floored where `zero` (n, or null) is set; counted about `center`
// (|center| < 2^52) on Rice parameter `k` into `counts`, each folded code
// written to `folded` (n) where given. False where a code reaches 2^52
// (`counts` and `folded` then unspecified). allow_avx2 = false: the portable
// pass even where the CPU has AVX2 (the same answers; for tests).
bool CountStepCodes(const double* x, const uint8_t* zero, int64_t n, double step,
                    int64_t center, int k, StepCounts& counts, int64_t* folded,
                    bool allow_avx2 = true);

// Why DecodeRice stopped before its count of codes.
enum class RiceStatus { kOk, kShortUnary, kLongQuotient, kShortRemainders };

// Reads `n` Rice codes on parameter `k` (0..62) into `folded`: their unary
// parts from bit `unary_bit` of `unary` (`unary_bytes` long), their
// remainders from bit `remainder_bit` of `remainders`; both positions move
// past what was read. A quotient of `max_quotient` or more, or a part past
// its buffer's end, stops it (nothing is read outside the buffers).
RiceStatus DecodeRice(const uint8_t* unary, int64_t unary_bytes, int64_t& unary_bit,
                      const uint8_t* remainders, int64_t remainder_bytes,
                      int64_t& remainder_bit, int k, int64_t max_quotient, int64_t n,
                      int64_t* folded);

// DecodeRice, each code written as the value it stands for on a step:
// (code + center) * step in doubles (the code unzigzagged where `zigzag`),
// as quantized_vectors.restore scales codes before its domain's transform.
RiceStatus DecodeRiceSteps(const uint8_t* unary, int64_t unary_bytes, int64_t& unary_bit,
                           const uint8_t* remainders, int64_t remainder_bytes,
                           int64_t& remainder_bit, int k, int64_t max_quotient, int64_t n,
                           bool zigzag, int64_t center, double step, double* values);

}  // namespace jaxjpeg

#endif  // JAXJPEG_RICE_CODE_H_
