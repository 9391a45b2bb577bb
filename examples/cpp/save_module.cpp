// Saves the parameters of a small torch::nn::Module as a safetensors file,
// streaming them one at a time with trinity_stream_saver's C++ API.
//
//   save_module OUTPUT.safetensors [--overlap]
//
// The module's weights come from a fixed seed, so that a test can rebuild
// the same values in Python and compare.
#include <torch/torch.h>

#include <trinity_stream_saver/stream_saver.h>

#include <cstring>
#include <iostream>

namespace tss = trinity_stream_saver;

struct TinyNet : torch::nn::Module {
  TinyNet() {
    embed = register_module("embed", torch::nn::Embedding(16, 8));
    proj = register_module("proj", torch::nn::Linear(8, 4));
  }
  torch::nn::Embedding embed{nullptr};
  torch::nn::Linear proj{nullptr};
};

int main(int argc, char** argv) {
  if (argc < 2) {
    std::cerr << "usage: " << argv[0] << " OUTPUT.safetensors [--overlap]\n";
    return 2;
  }
  torch::manual_seed(0);
  TinyNet net;
  const auto params = net.named_parameters(/*recurse=*/true);

  // The metadata is collected once (a trainer keeps it for every save).
  std::vector<tss::TensorMeta> meta;
  for (const auto& param : params) meta.push_back(tss::tensor_meta(param.key(), param.value()));

  tss::SaveOptions options;
  options.overlap = argc > 2 && std::strcmp(argv[2], "--overlap") == 0;
  options.metadata = tss::Metadata{{"format", "pt"}};

  std::size_t next = 0;
  try {
    const std::string path = tss::save_safetensors_streaming(
        [&]() -> std::optional<std::pair<std::string, at::Tensor>> {
          if (next == params.size()) return std::nullopt;
          const auto& param = params[next++];
          return std::make_pair(param.key(), param.value().detach());
        },
        argv[1], meta, options);
    std::cout << "saved " << meta.size() << " tensors to " << path << "\n";
  } catch (const tss::OsError& error) {
    std::cerr << "cannot save: " << error.what() << " (errno " << error.error_number() << ")\n";
    return 1;
  } catch (const std::exception& error) {
    std::cerr << "cannot save: " << error.what() << "\n";
    return 1;
  }
  return 0;
}
