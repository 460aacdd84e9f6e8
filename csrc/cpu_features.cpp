// Runtime CPU feature detection and the torchmerge::_set_cpu_isa op (schema defined in torchmerge/ops/_loader.py).
#include "common.h"

#include <atomic>

namespace torchmerge {
namespace {

// -1 = auto (best supported); otherwise an Isa value chosen by _set_cpu_isa.
std::atomic<int> g_isa_override{-1};

constexpr Isa kTiers[] = {Isa::Scalar, Isa::Avx2, Isa::Avx512, Isa::Avx512Vnni, Isa::Avx512Vbmi};

Isa best_supported() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl")) {
    if (!__builtin_cpu_supports("avx512vnni")) return Isa::Avx512;
    return __builtin_cpu_supports("avx512vbmi") ? Isa::Avx512Vbmi : Isa::Avx512Vnni;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::Avx2;
  return Isa::Scalar;
}

std::string set_cpu_isa(std::string isa) {
  const int previous = g_isa_override.load();
  const std::string prev_name = previous < 0 ? "auto" : isa_name(static_cast<Isa>(previous));
  int wanted = isa == "auto" ? -1 : -2;
  for (Isa t : kTiers)
    if (isa == isa_name(t)) wanted = int(t);
  TORCH_CHECK_VALUE(wanted != -2, "_set_cpu_isa: isa must be one of 'auto', 'avx512vbmi', 'avx512vnni', 'avx512', 'avx2', "
                    "'scalar'; got '", isa, "'");
  TORCH_CHECK_VALUE(wanted <= int(best_supported()), "_set_cpu_isa: this CPU does not support '", isa,
                    "'; best supported is '", isa_name(best_supported()), "'");
  g_isa_override.store(wanted);
  return prev_name;
}

}  // namespace

Isa active_isa() {
  static const Isa best = best_supported();
  const int forced = g_isa_override.load(std::memory_order_relaxed);
  return forced < 0 ? best : static_cast<Isa>(forced);
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Avx512Vbmi: return "avx512vbmi";
    case Isa::Avx512Vnni: return "avx512vnni";
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2";
    default: return "scalar";
  }
}

TORCH_LIBRARY_IMPL(torchmerge, CompositeExplicitAutograd, m) {
  m.impl("_set_cpu_isa", &set_cpu_isa);
}

}  // namespace torchmerge
