// A minimal client of the Attachments service for the tests (nbdctl has no command for
// ResizeAttachment yet: the node plugin is its only production caller).
//
//   attach-api-client unix:///path/api.sock resize VOLUME
//   attach-api-client unix:///path/api.sock list
//
// Prints one line per attachment: volume device mode size link_ok link_error. Exit 0 on success,
// 1 with the gRPC code and message on stderr otherwise.
#include <chrono>
#include <iostream>
#include <string>

#include <grpcpp/grpcpp.h>

#include "datapath/api/attach.grpc.pb.h"

namespace v1 = ::nbdcsi::datapath::v1;

namespace {

void Print(const v1::Attachment& a) {
  std::cout << a.volume() << " " << a.device() << " " << a.mode() << " " << a.size() << " "
            << (a.link_ok() ? "1" : "0") << " " << a.link_error() << "\n";
}

std::unique_ptr<grpc::ClientContext> Ctx() {
  auto c = std::make_unique<grpc::ClientContext>();
  c->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  return c;
}

int Fail(const grpc::Status& s) {
  std::cerr << "attach-api-client: " << s.error_code() << ": " << s.error_message() << "\n";
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::cerr << "usage: attach-api-client ENDPOINT resize VOLUME | list\n";
    return 2;
  }
  auto stub = v1::Attachments::NewStub(
      grpc::CreateChannel(argv[1], grpc::InsecureChannelCredentials()));
  const std::string cmd = argv[2];
  if (cmd == "resize" && argc == 4) {
    v1::ResizeAttachmentRequest req;
    req.set_volume(argv[3]);
    v1::ResizeAttachmentResponse resp;
    auto s = stub->ResizeAttachment(Ctx().get(), req, &resp);
    if (!s.ok()) return Fail(s);
    Print(resp.attachment());
    return 0;
  }
  if (cmd == "list" && argc == 3) {
    v1::ListAttachmentsResponse resp;
    auto s = stub->ListAttachments(Ctx().get(), {}, &resp);
    if (!s.ok()) return Fail(s);
    for (const auto& a : resp.attachments()) Print(a);
    return 0;
  }
  std::cerr << "usage: attach-api-client ENDPOINT resize VOLUME | list\n";
  return 2;
}
