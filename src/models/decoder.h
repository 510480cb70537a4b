// The Llama-family decoder (AFM-4.5B's Arcee and Llama itself differ only in the MLP).
#pragma once
#include <memory>

#include "model.h"

namespace afm {

enum class MlpKind {
  ReluSquared,  // Arcee: down(relu(up x)^2)
  SwiGLU,       // Llama: down(silu(gate x) * up x)
};

std::unique_ptr<Model> build_decoder(ModelContext& context, MlpKind mlp);

}  // namespace afm
