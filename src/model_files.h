// A model as users have it on disk: an HF checkpoint folder (config.json, safetensors,
// tokenizer.json, tokenizer_config.json, generation_config.json) or one GGUF file that holds all of
// it. These read the parts other than the weights; build_model() reads the weights.
#pragma once
#include <string>
#include <vector>

#include "chat_template.h"
#include "sampler.h"
#include "tokenizer.h"

namespace afm {

// A path named *.gguf (existing or not) or a file that starts with GGUF's magic; not a folder.
bool is_gguf_path(const std::string& path);

Tokenizer load_model_tokenizer(const std::string& model_path);
ChatTemplate load_model_chat_template(const std::string& model_path);
// The tokens that end an assistant turn in the chat formats afm knows (ChatML's <|im_end|>,
// Llama 3's <|eot_id|>) that this vocabulary has: a chat reply stops at them as at eos.
std::vector<int32_t> end_of_turn_token_ids(const Tokenizer& tokenizer);
// generation_config.json's sampling defaults (HF's defaults where there is none, as for GGUF).
GenerationConfig load_model_generation_config(const std::string& model_path, const ModelTokenIds& model_ids);

}  // namespace afm
