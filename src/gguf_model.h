// A GGUF file read as the HF model it was converted from: config.json's fields from the metadata,
// tensors under HF's names and layout, and a tokenizer.json and chat template built the way
// transformers builds them from a GGUF. The model code then cannot tell the two sources apart.
#pragma once
#include <optional>
#include <string>

#include "config.h"
#include "gguf.h"
#include "safetensors.h"

namespace afm {

// Architectures `llama` and `arcee`; anything else is an afm::Error naming it.
ModelConfig gguf_model_config(const GGUFFile& file);

// The tensors renamed to HF's, with llama.cpp's row permutation of attn_q and attn_k undone
// (its converter interleaves each head's rotary halves; afm rotates halves, as HF does).
Checkpoint gguf_checkpoint(const GGUFFile& file, const ModelConfig& config);

// tokenizer.json text for the file's gpt2-style BPE tokenizer (tokenizer.ggml.*).
std::string gguf_tokenizer_json(const GGUFFile& file);

struct GGUFChatTemplate {
  std::string source;
  std::optional<std::string> bos_token, eos_token;
};
// tokenizer.chat_template, with the bos/eos token texts the template sees; afm::Error when absent.
GGUFChatTemplate gguf_chat_template(const GGUFFile& file);

}  // namespace afm
