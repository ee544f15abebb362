// The CPU decode handler symbol, registered with XLA as "jaxjpeg_decode".
#ifndef JAXJPEG_FFI_CPU_H_
#define JAXJPEG_FFI_CPU_H_

#include "xla/ffi/api/api.h"

namespace jaxjpeg {
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxjpegDecodeCpu);
}  // namespace jaxjpeg

#endif  // JAXJPEG_FFI_CPU_H_
