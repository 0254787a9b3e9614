#include "specdec/client.h"

#include <algorithm>
#include <fstream>
#include <mutex>
#include <optional>
#include <sstream>

#include <grpcpp/grpcpp.h>

#include "specdec/v1/specdec.grpc.pb.h"

namespace specdec {
namespace pb = ::specdec::v1;

// The public enums are cast to and from the generated ones, so their values must agree.
static_assert(static_cast<int>(Mode::kDraft) == pb::MODE_DRAFT);
static_assert(static_cast<int>(FinishReason::kContext) == pb::FINISH_REASON_CONTEXT);

// ---- Status and names ------------------------------------------------------------------------

const char* StatusCodeName(grpc::StatusCode code) {
  switch (code) {
    case grpc::StatusCode::OK: return "OK";
    case grpc::StatusCode::CANCELLED: return "CANCELLED";
    case grpc::StatusCode::UNKNOWN: return "UNKNOWN";
    case grpc::StatusCode::INVALID_ARGUMENT: return "INVALID_ARGUMENT";
    case grpc::StatusCode::DEADLINE_EXCEEDED: return "DEADLINE_EXCEEDED";
    case grpc::StatusCode::NOT_FOUND: return "NOT_FOUND";
    case grpc::StatusCode::ALREADY_EXISTS: return "ALREADY_EXISTS";
    case grpc::StatusCode::PERMISSION_DENIED: return "PERMISSION_DENIED";
    case grpc::StatusCode::RESOURCE_EXHAUSTED: return "RESOURCE_EXHAUSTED";
    case grpc::StatusCode::FAILED_PRECONDITION: return "FAILED_PRECONDITION";
    case grpc::StatusCode::ABORTED: return "ABORTED";
    case grpc::StatusCode::OUT_OF_RANGE: return "OUT_OF_RANGE";
    case grpc::StatusCode::UNIMPLEMENTED: return "UNIMPLEMENTED";
    case grpc::StatusCode::INTERNAL: return "INTERNAL";
    case grpc::StatusCode::UNAVAILABLE: return "UNAVAILABLE";
    case grpc::StatusCode::DATA_LOSS: return "DATA_LOSS";
    case grpc::StatusCode::UNAUTHENTICATED: return "UNAUTHENTICATED";
    default: return "UNKNOWN";
  }
}

std::string Status::ToString() const {
  if (ok()) return "OK";
  return std::string(StatusCodeName(code_)) + ": " + message_;
}

const char* ModeName(Mode mode) {
  switch (mode) {
    case Mode::kSpeculative: return "speculative";
    case Mode::kTarget: return "target";
    case Mode::kDraft: return "draft";
    default: return "unspecified";
  }
}

const char* FinishReasonName(FinishReason reason) {
  switch (reason) {
    case FinishReason::kLength: return "length";
    case FinishReason::kEos: return "eos";
    case FinishReason::kStop: return "stop";
    case FinishReason::kCancelled: return "cancelled";
    case FinishReason::kContext: return "context";
    default: return "unspecified";
  }
}

// ---- Cancellation ----------------------------------------------------------------------------

struct CancelToken::State {
  std::mutex mu;
  bool cancelled = false;
  std::vector<grpc::ClientContext*> active;  // contexts of the calls now using the token
};

CancelToken::CancelToken() : state_(std::make_shared<State>()) {}

void CancelToken::Cancel() const {
  std::lock_guard<std::mutex> lock(state_->mu);
  state_->cancelled = true;
  for (grpc::ClientContext* context : state_->active) context->TryCancel();
}

bool CancelToken::cancelled() const {
  std::lock_guard<std::mutex> lock(state_->mu);
  return state_->cancelled;
}

namespace {

// Registers a call's context with a token for as long as the call runs, so that Cancel() from
// another thread reaches it. Declared after the context, so it is unregistered (under the lock)
// before the context is destroyed and Cancel() never touches a dead one.
class CancelScope {
 public:
  CancelScope(std::shared_ptr<CancelToken::State> state, grpc::ClientContext* context)
      : state_(std::move(state)), context_(context) {
    if (state_ == nullptr) return;
    std::lock_guard<std::mutex> lock(state_->mu);
    // Cancelling before the call starts is allowed: gRPC cancels it as soon as it starts.
    if (state_->cancelled) context_->TryCancel();
    state_->active.push_back(context_);
  }
  ~CancelScope() {
    if (state_ == nullptr) return;
    std::lock_guard<std::mutex> lock(state_->mu);
    auto& active = state_->active;
    active.erase(std::find(active.begin(), active.end(), context_));
  }
  CancelScope(const CancelScope&) = delete;
  CancelScope& operator=(const CancelScope&) = delete;

 private:
  std::shared_ptr<CancelToken::State> state_;  // shared, so the caller may drop its token early
  grpc::ClientContext* context_;
};

// ---- Proto conversion ------------------------------------------------------------------------

pb::GenerateRequest BuildRequest(const std::string& prompt, const GenerateOptions& options) {
  pb::GenerateRequest request;
  request.set_prompt(prompt);
  // Only the fields that were given: proto3 `optional` keeps "unset" distinct from 0, and unset
  // means the server's default.
  if (options.max_new_tokens) request.set_max_new_tokens(*options.max_new_tokens);
  if (options.temperature) request.set_temperature(*options.temperature);
  if (options.top_p) request.set_top_p(*options.top_p);
  if (options.top_k) request.set_top_k(*options.top_k);
  if (options.seed) request.set_seed(*options.seed);
  for (const std::string& stop : options.stop) request.add_stop(stop);
  request.mutable_stop_token_ids()->Add(options.stop_token_ids.begin(),
                                        options.stop_token_ids.end());
  request.set_mode(static_cast<pb::Mode>(options.mode));
  request.set_num_speculative_tokens(options.num_speculative_tokens);
  request.set_ignore_eos(options.ignore_eos);
  request.set_request_id(options.request_id);
  return request;
}

Result FromProto(const pb::GenerateResponse& response) {
  Result result;
  result.text = response.text();
  result.token_ids.assign(response.token_ids().begin(), response.token_ids().end());
  result.finish_reason = static_cast<FinishReason>(response.finish_reason());
  result.usage = {response.usage().prompt_tokens(), response.usage().completion_tokens()};
  const pb::SpecStats& stats = response.stats();
  result.stats.drafted_tokens = stats.drafted_tokens();
  result.stats.accepted_tokens = stats.accepted_tokens();
  result.stats.acceptance_rate = stats.acceptance_rate();
  result.stats.mean_accepted_length = stats.mean_accepted_length();
  result.stats.verify_steps = stats.verify_steps();
  result.stats.accepted_by_position.assign(stats.accepted_by_position().begin(),
                                           stats.accepted_by_position().end());
  result.timing = {response.timing().queue_seconds(),
                   response.timing().time_to_first_token_seconds(),
                   response.timing().total_seconds()};
  result.request_id = response.request_id();
  result.seed = response.seed();
  result.mode = static_cast<Mode>(response.mode());
  return result;
}

// Folds a streamed chunk into the running result: text and tokens accumulate, everything else is
// the latest chunk's (the last one carries the final statistics).
void MergeChunk(Chunk&& chunk, Result* merged) {
  std::string text = std::move(merged->text);
  std::vector<int32_t> token_ids = std::move(merged->token_ids);
  text += chunk.text;
  token_ids.insert(token_ids.end(), chunk.token_ids.begin(), chunk.token_ids.end());
  *merged = std::move(chunk);
  merged->text = std::move(text);
  merged->token_ids = std::move(token_ids);
}

Status FromGrpc(const grpc::Status& status) {
  return Status(status.error_code(), status.error_message());
}

void ApplyOptions(const GenerateOptions& options, const std::string& api_key,
                  grpc::ClientContext* context) {
  if (!api_key.empty()) context->AddMetadata("authorization", "Bearer " + api_key);
  if (options.timeout) {
    context->set_deadline(std::chrono::system_clock::now() +
                          std::chrono::duration_cast<std::chrono::system_clock::duration>(
                              *options.timeout));
  }
}

}  // namespace

// ---- Client ----------------------------------------------------------------------------------

struct Client::Impl {
  Impl(std::shared_ptr<grpc::Channel> channel, std::string api_key)
      : channel(std::move(channel)),
        stub(pb::SpecDec::NewStub(this->channel)),
        api_key(std::move(api_key)) {}

  std::shared_ptr<grpc::Channel> channel;
  std::unique_ptr<pb::SpecDec::Stub> stub;  // thread-safe; one per client
  std::string api_key;
};

Client::Client(const std::string& address)
    : Client(grpc::CreateChannel(address, grpc::InsecureChannelCredentials())) {}

Client::Client(std::shared_ptr<grpc::Channel> channel, std::string api_key)
    : impl_(std::make_unique<Impl>(std::move(channel), std::move(api_key))) {}

namespace {

// The whole file, or nullopt if it cannot be read.
std::optional<std::string> ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return std::nullopt;
  std::ostringstream contents;
  contents << in.rdbuf();
  if (in.bad()) return std::nullopt;
  return contents.str();
}

}  // namespace

StatusOr<Client> Client::Connect(const std::string& address, const ConnectOptions& options) {
  const bool tls = options.tls || !options.tls_ca_file.empty() || !options.tls_cert_file.empty() ||
                   !options.tls_key_file.empty();
  if (!tls) {
    return Client(grpc::CreateChannel(address, grpc::InsecureChannelCredentials()), options.api_key);
  }
  if (options.tls_cert_file.empty() != options.tls_key_file.empty()) {
    return Status(grpc::StatusCode::INVALID_ARGUMENT,
                  "--tls-cert and --tls-key go together (a client certificate and its key)");
  }
  grpc::SslCredentialsOptions ssl;
  const std::pair<const std::string*, std::string*> files[] = {
      {&options.tls_ca_file, &ssl.pem_root_certs},
      {&options.tls_cert_file, &ssl.pem_cert_chain},
      {&options.tls_key_file, &ssl.pem_private_key},
  };
  for (const auto& [path, into] : files) {
    if (path->empty()) continue;
    std::optional<std::string> pem = ReadFile(*path);
    if (!pem) return Status(grpc::StatusCode::INVALID_ARGUMENT, "cannot read " + *path);
    *into = std::move(*pem);
  }
  return Client(grpc::CreateChannel(address, grpc::SslCredentials(ssl)), options.api_key);
}

Client::~Client() = default;
Client::Client(Client&&) noexcept = default;
Client& Client::operator=(Client&&) noexcept = default;

StatusOr<Result> Client::Generate(const std::string& prompt, const GenerateOptions& options,
                                  const CancelToken* cancel) const {
  grpc::ClientContext context;
  ApplyOptions(options, impl_->api_key, &context);
  CancelScope scope(cancel ? cancel->state_ : nullptr, &context);

  pb::GenerateResponse response;
  grpc::Status status = impl_->stub->Generate(&context, BuildRequest(prompt, options), &response);
  if (!status.ok()) return FromGrpc(status);
  return FromProto(response);
}

StatusOr<Result> Client::GenerateStream(const std::string& prompt, const GenerateOptions& options,
                                        const ChunkCallback& on_chunk,
                                        const CancelToken* cancel) const {
  grpc::ClientContext context;
  ApplyOptions(options, impl_->api_key, &context);
  CancelScope scope(cancel ? cancel->state_ : nullptr, &context);

  std::unique_ptr<grpc::ClientReader<pb::GenerateResponse>> reader =
      impl_->stub->GenerateStream(&context, BuildRequest(prompt, options));
  pb::GenerateResponse response;
  Result merged;
  bool stopped_by_callback = false;
  while (reader->Read(&response)) {
    Chunk chunk = FromProto(response);
    if (on_chunk && !on_chunk(chunk)) {
      stopped_by_callback = true;
      context.TryCancel();
      // Finish() expects every message to have been read; after TryCancel this ends at once.
      while (reader->Read(&response)) {
      }
      break;
    }
    MergeChunk(std::move(chunk), &merged);
  }
  grpc::Status status = reader->Finish();
  if (stopped_by_callback) {
    return Status(grpc::StatusCode::CANCELLED, "stopped by the chunk callback");
  }
  if (!status.ok()) return FromGrpc(status);
  return merged;
}

}  // namespace specdec
