// specdec-cpp: generate text with a specdec server from the command line, over the C++ client.
//
//   specdec-cpp --server localhost:50051 --max-new-tokens 64 "def fibonacci(n):"
//   specdec-cpp --server localhost:50051 --stream --temperature 0.8 --seed 7 "import os"
//   specdec-cpp --server localhost:50051 --json "class Stack:"
//
// The prompt and generated text go to stdout and the statistics to stderr, or, with --json, one
// JSON object (the shape of `specdec generate --json`) to stdout. Exit status: 0 on success,
// 2 for bad command-line usage, 3 when the call fails (then stderr has "error: CODE: message").
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <iostream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <cstdlib>
#include <type_traits>
#include <vector>

#include "specdec/client.h"

namespace {

constexpr int kExitUsage = 2;
constexpr int kExitCallFailed = 3;

constexpr const char* kUsage =
    "usage: specdec-cpp --server HOST:PORT [--stream] [--json] [--max-new-tokens N]\n"
    "                   [--temperature T] [--top-p P] [--top-k K] [--seed S]\n"
    "                   [--mode speculative|target|draft] [--stop STRING]...\n"
    "                   [--num-speculative-tokens N] [--timeout-ms MS]\n"
    "                   [--api-key KEY] [--tls] [--tls-ca FILE] [--tls-cert FILE --tls-key FILE]\n"
    "                   PROMPT\n"
    "\n"
    "Sampling flags left out are not sent, so the server's defaults apply (greedy, 128 tokens).\n"
    "  --stream          print the text as it is generated (GenerateStream)\n"
    "  --json            print one JSON object: text, token_ids, finish_reason, stats, ...\n"
    "  --timeout-ms MS   deadline for the whole call; DEADLINE_EXCEEDED when it passes\n"
    "  --api-key KEY     the server's API key (default: $SPECDEC_API_KEY)\n"
    "  --tls             TLS, verifying the server with the system's CAs\n"
    "  --tls-ca FILE     TLS, verifying the server with this CA (PEM)\n"
    "  --tls-cert FILE   a client certificate (PEM), for mTLS; with --tls-key FILE\n";

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct CliArgs {
  std::string server;
  std::string prompt;
  bool stream = false;
  bool json = false;
  bool help = false;
  specdec::GenerateOptions options;
  specdec::ConnectOptions connect;
};

// ---- Command line ----------------------------------------------------------------------------

template <typename T>
T ParseNumber(std::string_view flag, std::string_view text) {
  T value{};
  const char* end = text.data() + text.size();
  auto [ptr, error] = std::from_chars(text.data(), end, value);
  if (error != std::errc() || ptr != end) {
    throw UsageError(std::string(flag) + ": not a valid number: '" + std::string(text) + "'");
  }
  return value;
}

specdec::Mode ParseMode(std::string_view text) {
  if (text == "speculative") return specdec::Mode::kSpeculative;
  if (text == "target") return specdec::Mode::kTarget;
  if (text == "draft") return specdec::Mode::kDraft;
  throw UsageError("--mode: one of speculative, target, draft; got '" + std::string(text) + "'");
}

// Applies one option that takes a value ("--flag value" or "--flag=value").
void ApplyValueFlag(std::string_view flag, std::string_view value, CliArgs* args) {
  specdec::GenerateOptions& o = args->options;
  if (flag == "--server") {
    args->server = value;
  } else if (flag == "--max-new-tokens") {
    o.max_new_tokens = ParseNumber<int32_t>(flag, value);
  } else if (flag == "--temperature") {
    o.temperature = ParseNumber<float>(flag, value);
  } else if (flag == "--top-p") {
    o.top_p = ParseNumber<float>(flag, value);
  } else if (flag == "--top-k") {
    o.top_k = ParseNumber<int32_t>(flag, value);
  } else if (flag == "--seed") {
    o.seed = ParseNumber<uint64_t>(flag, value);
  } else if (flag == "--mode") {
    o.mode = ParseMode(value);
  } else if (flag == "--stop") {
    o.stop.emplace_back(value);
  } else if (flag == "--num-speculative-tokens") {
    o.num_speculative_tokens = ParseNumber<int32_t>(flag, value);
  } else if (flag == "--timeout-ms") {
    o.timeout = std::chrono::milliseconds(ParseNumber<int64_t>(flag, value));
  } else if (flag == "--api-key") {
    args->connect.api_key = value;
  } else if (flag == "--tls-ca") {
    args->connect.tls_ca_file = value;
  } else if (flag == "--tls-cert") {
    args->connect.tls_cert_file = value;
  } else if (flag == "--tls-key") {
    args->connect.tls_key_file = value;
  } else {
    throw UsageError("unknown option " + std::string(flag));
  }
}

bool ApplySwitch(std::string_view flag, CliArgs* args) {
  if (flag == "--stream") return args->stream = true;
  if (flag == "--json") return args->json = true;
  if (flag == "--tls") return args->connect.tls = true;
  if (flag == "--help" || flag == "-h") return args->help = true;
  return false;
}

CliArgs ParseArgs(int argc, char** argv) {
  CliArgs args;
  std::vector<std::string> positional;
  bool options_done = false;
  for (int i = 1; i < argc; ++i) {
    std::string_view arg = argv[i];
    if (options_done || arg.size() < 2 || arg[0] != '-') {
      positional.emplace_back(arg);
    } else if (arg == "--") {
      options_done = true;
    } else if (ApplySwitch(arg, &args)) {
      continue;
    } else if (size_t eq = arg.find('='); eq != std::string_view::npos) {
      ApplyValueFlag(arg.substr(0, eq), arg.substr(eq + 1), &args);
    } else if (i + 1 < argc) {
      // The value may itself start with '-' (--temperature -1), so it is never read as a flag.
      ApplyValueFlag(arg, argv[++i], &args);
    } else {
      throw UsageError(std::string(arg) + " needs a value (or is unknown)");
    }
  }
  if (args.help) return args;
  if (args.server.empty()) throw UsageError("--server HOST:PORT is required");
  if (positional.size() != 1) throw UsageError("give exactly one PROMPT");
  args.prompt = positional.front();
  return args;
}

// ---- Output ----------------------------------------------------------------------------------

void AppendJsonString(std::string_view text, std::string* out) {
  out->push_back('"');
  for (char c : text) {
    switch (c) {
      case '"': *out += "\\\""; break;
      case '\\': *out += "\\\\"; break;
      case '\n': *out += "\\n"; break;
      case '\r': *out += "\\r"; break;
      case '\t': *out += "\\t"; break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          char escaped[8];
          std::snprintf(escaped, sizeof escaped, "\\u%04x", c);
          *out += escaped;
        } else {
          out->push_back(c);  // UTF-8 passes through: the server's text is valid UTF-8
        }
    }
  }
  out->push_back('"');
}

// Shortest round-trip form; JSON has no NaN or infinity.
template <typename T>
std::string JsonNumber(T value) {
  if constexpr (std::is_floating_point_v<T>) {
    if (!std::isfinite(value)) return "null";
  }
  char buffer[32];
  auto [end, error] = std::to_chars(buffer, buffer + sizeof buffer, value);
  return std::string(buffer, end);
}

template <typename T>
std::string JsonArray(const std::vector<T>& values) {
  std::string out = "[";
  for (size_t i = 0; i < values.size(); ++i) {
    if (i > 0) out += ", ";
    out += JsonNumber(values[i]);
  }
  return out + "]";
}

// The same keys as `specdec generate --json` (specdec.client.response_dict).
std::string ResultJson(const specdec::Result& r) {
  std::string out = "{\"request_id\": ";
  AppendJsonString(r.request_id, &out);
  out += ", \"text\": ";
  AppendJsonString(r.text, &out);
  out += ", \"token_ids\": " + JsonArray(r.token_ids);
  out += ", \"finish_reason\": \"" + std::string(specdec::FinishReasonName(r.finish_reason)) + "\"";
  out += ", \"usage\": {\"prompt_tokens\": " + JsonNumber(r.usage.prompt_tokens) +
         ", \"completion_tokens\": " + JsonNumber(r.usage.completion_tokens) + "}";
  out += ", \"stats\": {\"drafted_tokens\": " + JsonNumber(r.stats.drafted_tokens) +
         ", \"accepted_tokens\": " + JsonNumber(r.stats.accepted_tokens) +
         ", \"acceptance_rate\": " + JsonNumber(r.stats.acceptance_rate) +
         ", \"mean_accepted_length\": " + JsonNumber(r.stats.mean_accepted_length) +
         ", \"verify_steps\": " + JsonNumber(r.stats.verify_steps) +
         ", \"accepted_by_position\": " + JsonArray(r.stats.accepted_by_position) + "}";
  out += ", \"timing\": {\"queue_seconds\": " + JsonNumber(r.timing.queue_seconds) +
         ", \"time_to_first_token_seconds\": " + JsonNumber(r.timing.time_to_first_token_seconds) +
         ", \"total_seconds\": " + JsonNumber(r.timing.total_seconds) + "}";
  out += ", \"seed\": " + JsonNumber(r.seed);
  out += ", \"mode\": \"" + std::string(specdec::ModeName(r.mode)) + "\"}";
  return out;
}

void PrintSummary(const specdec::Result& r) {
  std::fprintf(stderr, "[%s; %zu tokens in %.2fs; acceptance %.2f, %.2f tokens/verify]\n",
               specdec::FinishReasonName(r.finish_reason), r.token_ids.size(),
               r.timing.total_seconds, r.stats.acceptance_rate, r.stats.mean_accepted_length);
}

// ---- Main ------------------------------------------------------------------------------------

specdec::StatusOr<specdec::Result> Run(CliArgs args) {
  if (args.connect.api_key.empty()) {
    if (const char* key = std::getenv("SPECDEC_API_KEY")) args.connect.api_key = key;
  }
  specdec::StatusOr<specdec::Client> connected = specdec::Client::Connect(args.server, args.connect);
  if (!connected.ok()) return connected.status();
  const specdec::Client& client = *connected;
  if (!args.stream) return client.Generate(args.prompt, args.options);
  if (args.json) return client.GenerateStream(args.prompt, args.options, nullptr);
  std::cout << args.prompt << std::flush;
  auto result = client.GenerateStream(args.prompt, args.options, [](const specdec::Chunk& chunk) {
    std::cout << chunk.text << std::flush;
    return true;
  });
  std::cout << "\n";
  return result;
}

}  // namespace

int main(int argc, char** argv) {
  CliArgs args;
  try {
    args = ParseArgs(argc, argv);
  } catch (const UsageError& e) {
    std::cerr << "specdec-cpp: " << e.what() << "\n\n" << kUsage;
    return kExitUsage;
  }
  if (args.help) {
    std::cout << kUsage;
    return 0;
  }

  specdec::StatusOr<specdec::Result> result = Run(args);
  if (!result.ok()) {
    std::cerr << "error: " << result.status().ToString() << "\n";
    return kExitCallFailed;
  }
  if (args.json) {
    std::cout << ResultJson(*result) << "\n";
  } else {
    if (!args.stream) std::cout << args.prompt << result->text << "\n";
    PrintSummary(*result);
  }
  return 0;
}
