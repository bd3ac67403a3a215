// The peer of P1 (DESIGN.md): libstdc++'s std::stop_callback, constructed
// and destroyed on a live stop_token, the C++20 way to register a
// cancellation callback for one operation. The loop runs here, in C++, so
// the peer pays no call across the FFI per operation.
#include <cstdint>
#include <stop_token>

extern "C" {

void *callcancel_cpp_source_new() { return new std::stop_source(); }

void callcancel_cpp_source_free(void *source) {
  delete static_cast<std::stop_source *>(source);
}

// `n` callbacks, each capturing a value (as every P1 contender's does),
// registered on the source's token and deregistered again, one at a time.
void callcancel_cpp_lifecycles(void *source, std::uint64_t n) {
  std::stop_token token = static_cast<std::stop_source *>(source)->get_token();
  for (std::uint64_t i = 0; i < n; ++i) {
    std::stop_callback callback(token, [i] { asm volatile("" : : "r"(i) : "memory"); });
    asm volatile("" : : : "memory");
  }
}

}  // extern "C"
