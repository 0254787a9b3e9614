// Tests of the specdec C++ library against a running server: what the command-line tool cannot
// reach (callbacks, cancellation from another thread, options left unset).
//
//   specdec_client_test HOST:PORT
//
// test_against_server.py starts the server on tiny checkpoints and runs this. Exit status 0 when
// every check passes; each failed check is printed.
#include <chrono>
#include <iostream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "specdec/client.h"

namespace {

int failures = 0;

#define CHECK(condition, detail)                                                         \
  do {                                                                                   \
    if (!(condition)) {                                                                  \
      ++failures;                                                                        \
      std::ostringstream message;                                                        \
      message << detail;                                                                 \
      std::cerr << "  FAILED " << __LINE__ << ": " #condition " -- " << message.str() << "\n"; \
    }                                                                                    \
  } while (0)

using specdec::CancelToken;
using specdec::Chunk;
using specdec::Client;
using specdec::GenerateOptions;
using specdec::Result;
using specdec::StatusOr;
using grpc::StatusCode;

// Long enough that a stream is still running when a test cancels it after its first chunk (the
// tiny checkpoints allow 512 positions).
GenerateOptions LongRequest() {
  GenerateOptions options;
  options.max_new_tokens = 300;
  options.ignore_eos = true;
  options.timeout = std::chrono::seconds(60);
  return options;
}

void StreamMatchesUnary(const Client& client) {
  GenerateOptions options;
  options.max_new_tokens = 12;
  options.timeout = std::chrono::seconds(60);
  StatusOr<Result> unary = client.Generate("def add(a, b):", options);
  CHECK(unary.ok(), unary.status().ToString());

  std::vector<Chunk> chunks;
  StatusOr<Result> merged = client.GenerateStream("def add(a, b):", options, [&](const Chunk& c) {
    chunks.push_back(c);
    return true;
  });
  CHECK(merged.ok(), merged.status().ToString());
  if (!unary.ok() || !merged.ok()) return;
  CHECK(merged->token_ids == unary->token_ids, "streamed tokens differ from unary ones");
  CHECK(merged->text == unary->text, merged->text << " vs " << unary->text);
  CHECK(merged->finished(), "the merged result has no finish reason");
  CHECK(!chunks.empty() && chunks.back().finished(), "the last chunk is not marked finished");
  for (size_t i = 0; i + 1 < chunks.size(); ++i) {
    CHECK(!chunks[i].finished(), "chunk " << i << " of " << chunks.size() << " is finished");
  }
}

void UnsetOptionsUseServerDefaults(const Client& client) {
  StatusOr<Result> result = client.Generate("import os", GenerateOptions{});
  CHECK(result.ok(), result.status().ToString());
  if (!result.ok()) return;
  // Defaults: 128 new tokens, greedy; the server draws a seed and reports it.
  CHECK(result->token_ids.size() <= 128, result->token_ids.size() << " tokens");
  CHECK(result->usage.completion_tokens == static_cast<int>(result->token_ids.size()),
        "usage.completion_tokens " << result->usage.completion_tokens);
}

void CallbackStopsStream(const Client& client) {
  int calls = 0;
  StatusOr<Result> result = client.GenerateStream("class Stack:", LongRequest(), [&](const Chunk&) {
    ++calls;
    return false;
  });
  CHECK(!result.ok() && result.status().code() == StatusCode::CANCELLED,
        result.status().ToString());
  CHECK(calls == 1, "the callback ran " << calls << " times after asking to stop");
}

void CancelFromAnotherThread(const Client& client) {
  CancelToken token;
  int calls = 0;
  auto on_chunk = [&](const Chunk&) {
    // Cancel from a different thread while the stream is running, as an application would.
    if (++calls == 1) std::thread([copy = token] { copy.Cancel(); }).join();
    return true;
  };
  StatusOr<Result> result = client.GenerateStream("for i in range(", LongRequest(), on_chunk, &token);
  CHECK(!result.ok() && result.status().code() == StatusCode::CANCELLED,
        result.status().ToString());
  CHECK(token.cancelled(), "the token does not report cancelled");
}

void CancelledTokenStopsNewCall(const Client& client) {
  CancelToken token;
  token.Cancel();
  StatusOr<Result> result = client.Generate("while True:", LongRequest(), &token);
  CHECK(!result.ok() && result.status().code() == StatusCode::CANCELLED,
        result.status().ToString());
}

void DeadlineExceeded(const Client& client) {
  GenerateOptions options = LongRequest();
  options.timeout = std::chrono::milliseconds(1);
  StatusOr<Result> unary = client.Generate("import sys", options);
  CHECK(unary.status().code() == StatusCode::DEADLINE_EXCEEDED, unary.status().ToString());
  StatusOr<Result> stream = client.GenerateStream("import sys", options, nullptr);
  CHECK(stream.status().code() == StatusCode::DEADLINE_EXCEEDED, stream.status().ToString());
}

void InvalidArgumentCarriesServerMessage(const Client& client) {
  GenerateOptions options;
  options.top_p = 1.5f;
  StatusOr<Result> result = client.Generate("x = 1", options);
  CHECK(result.status().code() == StatusCode::INVALID_ARGUMENT, result.status().ToString());
  CHECK(result.status().message().rfind("top_p: must be in (0, 1]", 0) == 0,
        "message: " << result.status().message());
}

void UnreachableServerIsUnavailable() {
  Client client("127.0.0.1:1");  // nothing listens on port 1
  GenerateOptions options;
  options.timeout = std::chrono::seconds(20);
  StatusOr<Result> result = client.Generate("x", options);
  CHECK(result.status().code() == StatusCode::UNAVAILABLE, result.status().ToString());
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: specdec_client_test HOST:PORT\n";
    return 2;
  }
  const Client client(argv[1]);
  const struct {
    const char* name;
    void (*run)(const Client&);
  } tests[] = {
      {"stream_matches_unary", StreamMatchesUnary},
      {"unset_options_use_server_defaults", UnsetOptionsUseServerDefaults},
      {"callback_stops_stream", CallbackStopsStream},
      {"cancel_from_another_thread", CancelFromAnotherThread},
      {"cancelled_token_stops_new_call", CancelledTokenStopsNewCall},
      {"deadline_exceeded", DeadlineExceeded},
      {"invalid_argument_carries_server_message", InvalidArgumentCarriesServerMessage},
      {"unreachable_server_is_unavailable", [](const Client&) { UnreachableServerIsUnavailable(); }},
  };
  for (const auto& test : tests) {
    const int before = failures;
    test.run(client);
    std::cout << (failures == before ? "PASS " : "FAIL ") << test.name << std::endl;
  }
  return failures == 0 ? 0 : 1;
}
