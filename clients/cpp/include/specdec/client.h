// specdec C++ client: generate text with a specdec server over gRPC.
//
//   specdec::Client client("localhost:50051");
//   specdec::GenerateOptions options;
//   options.max_new_tokens = 64;
//   options.timeout = std::chrono::seconds(10);
//   specdec::StatusOr<specdec::Result> result = client.Generate("def fibonacci(n):", options);
//   if (!result.ok()) std::cerr << result.status().ToString() << "\n";
//   else std::cout << result->text << "\n";
//
// The API mirrors protos/specdec/v1/specdec.proto, which stays the single source of truth; the
// generated protobuf and gRPC types are an implementation detail and do not appear here.
//
// Thread-safety: a Client may be used from any number of threads at once (each call has its own
// gRPC context; the channel is shared). A CancelToken may be cancelled from any thread. Status,
// Result, GenerateOptions are plain values with no synchronisation of their own.
#ifndef SPECDEC_CLIENT_H_
#define SPECDEC_CLIENT_H_

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <grpcpp/support/status_code_enum.h>

namespace grpc {
class Channel;
}  // namespace grpc

namespace specdec {

// The outcome of a call: OK, or a gRPC status code with the server's message (for example
// INVALID_ARGUMENT "top_p: must be in (0, 1], got 1.5"), or one set by the client library
// (DEADLINE_EXCEEDED, CANCELLED, UNAVAILABLE when the server cannot be reached).
class Status {
 public:
  Status() = default;  // OK
  Status(grpc::StatusCode code, std::string message) : code_(code), message_(std::move(message)) {}

  bool ok() const { return code_ == grpc::StatusCode::OK; }
  grpc::StatusCode code() const { return code_; }
  const std::string& message() const { return message_; }
  // "INVALID_ARGUMENT: top_p: must be in (0, 1], got 1.5", or "OK".
  std::string ToString() const;

 private:
  grpc::StatusCode code_ = grpc::StatusCode::OK;
  std::string message_;
};

// The canonical upper-case name of a code, as gRPC spells it: "DEADLINE_EXCEEDED".
const char* StatusCodeName(grpc::StatusCode code);

// A value, or the Status saying why there is none. C++17 has no std::expected.
template <typename T>
class StatusOr {
 public:
  StatusOr(T value) : value_(std::move(value)) {}  // NOLINT: implicit, like absl::StatusOr
  // `status` must not be OK: an OK StatusOr always holds a value.
  StatusOr(Status status) : status_(std::move(status)) {}  // NOLINT

  bool ok() const { return value_.has_value(); }
  const Status& status() const { return status_; }
  // value() and the operators require ok(); value() throws std::bad_optional_access otherwise.
  T& value() & { return value_.value(); }
  const T& value() const& { return value_.value(); }
  T&& value() && { return std::move(value_).value(); }
  T& operator*() & { return *value_; }
  const T& operator*() const& { return *value_; }
  T* operator->() { return &*value_; }
  const T* operator->() const { return &*value_; }

 private:
  Status status_;
  std::optional<T> value_;
};

enum class Mode {
  kUnspecified = 0,  // speculative when the server has a draft, else target
  kSpeculative = 1,  // the target's output, faster
  kTarget = 2,       // the target alone
  kDraft = 3,        // the draft alone
};

enum class FinishReason {
  kUnspecified = 0,  // not finished: every streamed chunk but the last
  kLength = 1,       // max_new_tokens reached
  kEos = 2,          // an end-of-sequence token
  kStop = 3,         // a stop string or stop token id
  kCancelled = 4,
  kContext = 5,  // the context limit, before max_new_tokens
};

// Lower-case names as the Python client prints them: "speculative", "length", "eos", ...
const char* ModeName(Mode mode);
const char* FinishReasonName(FinishReason reason);

// Per-request settings. Sampling fields left unset are not sent, so the server's defaults apply
// (greedy, 128 new tokens); see GenerateRequest in the proto for their ranges.
struct GenerateOptions {
  std::optional<int32_t> max_new_tokens;
  std::optional<float> temperature;  // 0 = greedy
  std::optional<float> top_p;
  std::optional<int32_t> top_k;  // 0 = off
  std::optional<uint64_t> seed;  // unset: drawn by the server, returned in Result::seed
  std::vector<std::string> stop;
  std::vector<int32_t> stop_token_ids;
  Mode mode = Mode::kUnspecified;
  int32_t num_speculative_tokens = 0;  // drafted tokens per step; 0 = adaptive
  bool ignore_eos = false;
  std::string request_id;  // optional; echoed back and used in the server's logs

  // How long the whole call may take, stream included; the server stops generating when it
  // passes and the call returns DEADLINE_EXCEEDED. Unset: no deadline.
  std::optional<std::chrono::nanoseconds> timeout;
};

struct Usage {
  int32_t prompt_tokens = 0;
  int32_t completion_tokens = 0;
};

struct SpecStats {
  int32_t drafted_tokens = 0;
  int32_t accepted_tokens = 0;
  float acceptance_rate = 0;       // accepted / drafted
  float mean_accepted_length = 0;  // tokens emitted per verify pass
  int32_t verify_steps = 0;
  std::vector<int32_t> accepted_by_position;
};

struct Timing {
  double queue_seconds = 0;
  double time_to_first_token_seconds = 0;
  double total_seconds = 0;
};

// A whole generation (Generate, and GenerateStream's merged return value) or one streamed chunk.
// A chunk carries the text and token ids produced since the previous one; only the last chunk has
// finish_reason set and meaningful usage, stats, timing and seed.
struct Result {
  std::string text;
  std::vector<int32_t> token_ids;
  FinishReason finish_reason = FinishReason::kUnspecified;
  Usage usage;
  SpecStats stats;
  Timing timing;
  std::string request_id;
  uint64_t seed = 0;  // the seed used
  Mode mode = Mode::kUnspecified;  // the mode that ran

  bool finished() const { return finish_reason != FinishReason::kUnspecified; }
};
using Chunk = Result;

// Cancels calls from any thread. Pass it to a call; Cancel() then stops that call, which returns
// CANCELLED (the server frees the request's slot within one engine step). Copies share state:
// cancelling one cancels all. Cancellation is permanent; a call started with a cancelled token
// returns CANCELLED at once, so use a fresh token per logical operation.
class CancelToken {
 public:
  CancelToken();
  void Cancel() const;
  bool cancelled() const;

  struct State;  // internal: shared between copies and the calls using the token

 private:
  friend class Client;
  std::shared_ptr<State> state_;
};

// Called with each streamed chunk, in order, on the calling thread. Return false to stop: the call
// is cancelled and GenerateStream returns CANCELLED.
using ChunkCallback = std::function<bool(const Chunk&)>;

// How to reach a server that wants more than plaintext and no key.
struct ConnectOptions {
  // Sent on every call as "authorization: Bearer <api_key>" (per-call metadata, so it also works
  // over plaintext to a server on loopback). Empty: no key.
  std::string api_key;
  // TLS, verifying the server with the CA certificates in tls_ca_file (PEM); with an empty
  // tls_ca_file, the system's roots. Set tls_ca_file alone and tls is implied.
  bool tls = false;
  std::string tls_ca_file;
  // mTLS: the client's certificate chain and private key (PEM), both or neither.
  std::string tls_cert_file;
  std::string tls_key_file;
};

// A connection to one specdec server. Movable, not copyable; thread-safe (see the top of the file).
// Construction does not connect: the channel connects on the first call, and a server that cannot
// be reached gives UNAVAILABLE from that call.
class Client {
 public:
  // An insecure (plaintext) channel to "host:port".
  explicit Client(const std::string& address);
  // Any channel you built (TLS, custom arguments, interceptors); the client shares ownership.
  // `api_key`, if not empty, goes with every call.
  explicit Client(std::shared_ptr<grpc::Channel> channel, std::string api_key = "");
  // A channel as `options` say; INVALID_ARGUMENT naming the file when a PEM file cannot be read,
  // or when only one of tls_cert_file and tls_key_file is given.
  static StatusOr<Client> Connect(const std::string& address, const ConnectOptions& options);
  ~Client();
  Client(Client&&) noexcept;
  Client& operator=(Client&&) noexcept;
  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;

  // The whole generation in one response. Blocks until it is done, the deadline passes, or
  // `cancel` is cancelled.
  StatusOr<Result> Generate(const std::string& prompt, const GenerateOptions& options = {},
                            const CancelToken* cancel = nullptr) const;

  // Streams the generation: `on_chunk` sees each chunk as the server produces it. Returns the
  // chunks merged (all the text and token ids, the last chunk's statistics) when the stream ends
  // normally, otherwise the status that ended it.
  StatusOr<Result> GenerateStream(const std::string& prompt, const GenerateOptions& options,
                                  const ChunkCallback& on_chunk,
                                  const CancelToken* cancel = nullptr) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace specdec

#endif  // SPECDEC_CLIENT_H_
