// The CPU decode handler symbols, registered with XLA as "jaxjpeg_decode"
// and "jaxjpeg_decode_parts" (outputs its tiles may write in part).
#ifndef JAXJPEG_FFI_CPU_H_
#define JAXJPEG_FFI_CPU_H_

#include "xla/ffi/api/api.h"

namespace jaxjpeg {
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxjpegDecodeCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxjpegDecodePartsCpu);
}  // namespace jaxjpeg

#endif  // JAXJPEG_FFI_CPU_H_
