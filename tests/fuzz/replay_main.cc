// A main() for fuzz_decode.cc without libFuzzer: runs LLVMFuzzerTestOneInput on
// every file named on the command line. Built with -fsanitize=address,undefined
// by tests/test_robustness.py::test_fuzz_regressions_under_sanitizers to replay
// tests/fuzz/regressions/ deterministically with any C++ compiler.
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);

int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    std::ifstream in(argv[i], std::ios::binary);
    if (!in) {
      std::fprintf(stderr, "cannot read %s\n", argv[i]);
      return 2;
    }
    const std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    // An exactly-sized heap copy, so AddressSanitizer sees reads past the end.
    std::vector<uint8_t> copy(bytes.begin(), bytes.end());
    std::fprintf(stderr, "replay %s (%zu bytes)\n", argv[i], copy.size());
    LLVMFuzzerTestOneInput(copy.data(), copy.size());
  }
  std::fprintf(stderr, "replayed %d inputs\n", argc - 1);
  return 0;
}
