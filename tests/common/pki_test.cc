#include "common/crypto/pki.h"

#include <gmock/gmock.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509_vfy.h>
#include <openssl/x509v3.h>
#include <sys/stat.h>

#include <chrono>
#include <cstdlib>
#include <ctime>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "common/crypto/crypto.h"
#include "fedlora/v1/fedlora.grpc.pb.h"
#include "tests/testing/test_util.h"

namespace fedlora::common {
namespace {

using ::fedlora::testutil::TempDir;
using ::fedlora::testutil::StatusIs;

std::string Read(const std::string& path) {
  auto r = ReadFileToString(path);
  EXPECT_TRUE(r.ok()) << r.status();
  return r.ok() ? *r : std::string();
}

struct X509Deleter {
  void operator()(X509* x) const { X509_free(x); }
};
using X509Ptr = std::unique_ptr<X509, X509Deleter>;

X509Ptr ParseCert(const std::string& pem) {
  BIO* bio = BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size()));
  X509Ptr cert(PEM_read_bio_X509(bio, nullptr, nullptr, nullptr));
  BIO_free(bio);
  EXPECT_NE(cert, nullptr);
  return cert;
}

// Verifies `cert_pem` against the single trust anchor `ca_pem` for `purpose`
// (X509_PURPOSE_SSL_SERVER / X509_PURPOSE_SSL_CLIENT). Returns the X509_V_* code.
int Verify(const std::string& ca_pem, const std::string& cert_pem, int purpose) {
  X509Ptr ca = ParseCert(ca_pem);
  X509Ptr cert = ParseCert(cert_pem);
  if (!ca || !cert) return -1;
  X509_STORE* store = X509_STORE_new();
  X509_STORE_add_cert(store, ca.get());
  X509_STORE_CTX* ctx = X509_STORE_CTX_new();
  X509_STORE_CTX_init(ctx, store, cert.get(), nullptr);
  X509_STORE_CTX_set_purpose(ctx, purpose);
  int ok = X509_verify_cert(ctx);
  int err = ok == 1 ? X509_V_OK : X509_STORE_CTX_get_error(ctx);
  if (ok == 1 && err != X509_V_OK) err = -2;
  X509_STORE_CTX_free(ctx);
  X509_STORE_free(store);
  return err;
}

int FileMode(const std::string& path) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) return -1;
  return static_cast<int>(st.st_mode & 0777);
}

TEST(Pki, InitWritesAllFilesWithPrivateKeys0600) {
  TempDir dir;
  std::string pki = dir.path() + "/nested/pki";  // created if absent
  ASSERT_TRUE(InitPki(pki).ok());
  for (const char* stem : {"ca", "coordinator", "admin"}) {
    EXPECT_EQ(FileMode(pki + "/" + stem + ".key"), 0600) << stem;
    EXPECT_EQ(FileMode(pki + "/" + stem + ".pem"), 0644) << stem;
    EXPECT_THAT(Read(pki + "/" + stem + ".key"), ::testing::HasSubstr("BEGIN PRIVATE KEY"));
  }
  EXPECT_THAT(InitPki(pki), StatusIs(absl::StatusCode::kAlreadyExists, "ca.key"));
}

TEST(Pki, ChainsRolesAndSans) {
  TempDir dir;
  ASSERT_TRUE(InitPki(dir.path()).ok());
  std::string ca = Read(dir.path() + "/ca.pem");
  std::string server = Read(dir.path() + "/coordinator.pem");
  std::string admin = Read(dir.path() + "/admin.pem");

  // The CA is a CA; the leaves are not.
  X509Ptr ca_cert = ParseCert(ca);
  ASSERT_TRUE(ca_cert);
  EXPECT_EQ(X509_check_ca(ca_cert.get()), 1);
  EXPECT_EQ(X509_check_ca(ParseCert(server).get()), 0);

  // Server certificate: serverAuth only, with the default SANs.
  EXPECT_EQ(Verify(ca, server, X509_PURPOSE_SSL_SERVER), X509_V_OK);
  EXPECT_NE(Verify(ca, server, X509_PURPOSE_SSL_CLIENT), X509_V_OK);
  X509Ptr server_cert = ParseCert(server);
  EXPECT_EQ(X509_check_host(server_cert.get(), "localhost", 0, 0, nullptr), 1);
  EXPECT_EQ(X509_check_ip_asc(server_cert.get(), "127.0.0.1", 0), 1);
  EXPECT_NE(X509_check_host(server_cert.get(), "evil.example.com", 0, 0, nullptr), 1);

  // Admin certificate: clientAuth only.
  EXPECT_EQ(Verify(ca, admin, X509_PURPOSE_SSL_CLIENT), X509_V_OK);
  EXPECT_NE(Verify(ca, admin, X509_PURPOSE_SSL_SERVER), X509_V_OK);

  auto sid = ReadCertIdentity(server);
  ASSERT_TRUE(sid.ok()) << sid.status();
  EXPECT_EQ(sid->common_name, "fedlora-coordinator");
  EXPECT_EQ(sid->role, "server");
  auto aid = ReadCertIdentity(admin);
  ASSERT_TRUE(aid.ok()) << aid.status();
  EXPECT_EQ(aid->common_name, "admin");
  EXPECT_EQ(aid->role, "admin");

  // Serial numbers are random, hence distinct.
  X509Ptr admin_cert = ParseCert(admin);
  EXPECT_NE(ASN1_INTEGER_cmp(X509_get_serialNumber(server_cert.get()),
                             X509_get_serialNumber(admin_cert.get())),
            0);
}

TEST(Pki, CustomSansDetectDnsAndIp) {
  TempDir dir;
  PkiOptions options;
  options.server_sans = {"coordinator.fleet.example", "10.1.2.3", "::1"};
  options.validity_days = 30;
  ASSERT_TRUE(InitPki(dir.path(), options).ok());
  X509Ptr cert = ParseCert(Read(dir.path() + "/coordinator.pem"));
  EXPECT_EQ(X509_check_host(cert.get(), "coordinator.fleet.example", 0, 0, nullptr), 1);
  EXPECT_EQ(X509_check_ip_asc(cert.get(), "10.1.2.3", 0), 1);
  EXPECT_EQ(X509_check_ip_asc(cert.get(), "::1", 0), 1);
  EXPECT_NE(X509_check_host(cert.get(), "localhost", 0, 0, nullptr), 1);
  // Validity: about 30 days from now.
  int days = 0, secs = 0;
  ASSERT_EQ(ASN1_TIME_diff(&days, &secs, nullptr, X509_get0_notAfter(cert.get())), 1);
  EXPECT_GE(days, 29);
  EXPECT_LE(days, 30);

  TempDir bad;
  PkiOptions bad_options;
  bad_options.server_sans = {"bad name,with comma"};
  EXPECT_THAT(InitPki(bad.path(), bad_options),
              StatusIs(absl::StatusCode::kInvalidArgument, "bad name,with comma"));
  EXPECT_FALSE(std::filesystem::exists(bad.path() + "/ca.key"));
  bad_options.server_sans = {};
  EXPECT_EQ(InitPki(bad.path(), bad_options).code(), absl::StatusCode::kInvalidArgument);
  bad_options.server_sans = {"localhost"};
  bad_options.validity_days = 0;
  EXPECT_THAT(InitPki(bad.path(), bad_options),
              StatusIs(absl::StatusCode::kInvalidArgument, "validity_days"));
}

TEST(Pki, IssueCertificateForEachRole) {
  TempDir dir;
  ASSERT_TRUE(InitPki(dir.path()).ok());
  std::string ca = Read(dir.path() + "/ca.pem");
  std::string out = dir.path() + "/issued";
  struct Case {
    const char* name;
    CertRole role;
    const char* ou;
  } cases[] = {{"hospital-a.agent_01", CertRole::kAgent, "agent"},
               {"alice", CertRole::kAdmin, "admin"},
               {"auditor", CertRole::kViewer, "viewer"}};
  for (const Case& c : cases) {
    ASSERT_TRUE(IssueCertificate(dir.path(), c.name, c.role, out, 10).ok()) << c.name;
    std::string pem = Read(out + "/" + c.name + ".pem");
    EXPECT_EQ(FileMode(out + "/" + c.name + ".key"), 0600);
    EXPECT_EQ(Verify(ca, pem, X509_PURPOSE_SSL_CLIENT), X509_V_OK) << c.name;
    EXPECT_NE(Verify(ca, pem, X509_PURPOSE_SSL_SERVER), X509_V_OK) << c.name;
    auto id = ReadCertIdentity(pem);
    ASSERT_TRUE(id.ok()) << id.status();
    EXPECT_EQ(id->common_name, c.name);
    EXPECT_EQ(id->role, c.ou);
  }
  // A server certificate issued later carries its name as SAN.
  ASSERT_TRUE(IssueCertificate(dir.path(), "coord2.example", CertRole::kServer, out).ok());
  std::string pem = Read(out + "/coord2.example.pem");
  EXPECT_EQ(Verify(ca, pem, X509_PURPOSE_SSL_SERVER), X509_V_OK);
  EXPECT_EQ(X509_check_host(ParseCert(pem).get(), "coord2.example", 0, 0, nullptr), 1);
  EXPECT_STREQ(CertRoleName(CertRole::kServer), "server");
}

TEST(Pki, CertificateFromAnotherCaFailsVerification) {
  TempDir a, b;
  ASSERT_TRUE(InitPki(a.path()).ok());
  ASSERT_TRUE(InitPki(b.path()).ok());
  ASSERT_TRUE(IssueCertificate(b.path(), "intruder", CertRole::kAgent, b.path()).ok());
  std::string ca_a = Read(a.path() + "/ca.pem");
  EXPECT_NE(Verify(ca_a, Read(b.path() + "/intruder.pem"), X509_PURPOSE_SSL_CLIENT), X509_V_OK);
  EXPECT_NE(Verify(ca_a, Read(b.path() + "/coordinator.pem"), X509_PURPOSE_SSL_SERVER), X509_V_OK);
  EXPECT_NE(Verify(ca_a, Read(b.path() + "/ca.pem"), X509_PURPOSE_SSL_CLIENT), X509_V_OK);
}

TEST(Pki, IssueCertificateErrors) {
  TempDir dir;
  EXPECT_THAT(IssueCertificate(dir.path(), "agent-1", CertRole::kAgent, dir.path()),
              StatusIs(absl::StatusCode::kNotFound, "ca.pem"));
  ASSERT_TRUE(InitPki(dir.path()).ok());
  for (const char* bad : {"", "../etc/passwd", "a/b", ".hidden", "-flag", "space name", "x\ny"}) {
    EXPECT_THAT(IssueCertificate(dir.path(), bad, CertRole::kAgent, dir.path()),
                StatusIs(absl::StatusCode::kInvalidArgument, "certificate name"))
        << bad;
  }
  EXPECT_EQ(IssueCertificate(dir.path(), std::string(65, 'a'), CertRole::kAgent, dir.path()).code(),
            absl::StatusCode::kInvalidArgument);
  // A CA key that does not belong to the CA certificate is refused.
  TempDir other;
  ASSERT_TRUE(InitPki(other.path()).ok());
  ASSERT_TRUE(WriteFileAtomic(dir.path() + "/ca.key", Read(other.path() + "/ca.key"), 0600).ok());
  EXPECT_THAT(IssueCertificate(dir.path(), "agent-1", CertRole::kAgent, dir.path()),
              StatusIs(absl::StatusCode::kFailedPrecondition, "does not match"));
}

TEST(Pki, ReadCertIdentityRejectsGarbage) {
  EXPECT_THAT(ReadCertIdentity("not a certificate").status(),
              StatusIs(absl::StatusCode::kInvalidArgument, "PEM certificate"));
  EXPECT_EQ(ReadCertIdentity("").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ReadCertIdentity("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
}

// ---- the certificates work for gRPC mutual TLS ------------------------------------

class RecordingAdmin final : public fedlora::v1::Admin::Service {
 public:
  grpc::Status Status(grpc::ServerContext* context, const fedlora::v1::StatusRequest*,
                      fedlora::v1::StatusResponse*) override {
    auto cn = context->auth_context()->FindPropertyValues("x509_common_name");
    last_cn_ = cn.empty() ? "" : std::string(cn[0].data(), cn[0].size());
    return grpc::Status::OK;
  }
  std::string last_cn_;
};

grpc::StatusCode CallAdmin(int port, const std::string& ca, const std::string& cert,
                           const std::string& key) {
  grpc::SslCredentialsOptions opts;
  opts.pem_root_certs = ca;
  opts.pem_cert_chain = cert;
  opts.pem_private_key = key;
  // An ipv4: target skips DNS resolution; the server certificate matches by its IP SAN.
  auto channel =
      grpc::CreateChannel("ipv4:127.0.0.1:" + std::to_string(port), grpc::SslCredentials(opts));
  auto stub = fedlora::v1::Admin::NewStub(channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  fedlora::v1::StatusRequest req;
  fedlora::v1::StatusResponse resp;
  return stub->Status(&ctx, req, &resp).error_code();
}

TEST(Pki, CertificatesWorkForGrpcMutualTls) {
  TempDir dir, rogue;
  ASSERT_TRUE(InitPki(dir.path()).ok());
  ASSERT_TRUE(IssueCertificate(dir.path(), "agent-7", CertRole::kAgent, dir.path()).ok());
  ASSERT_TRUE(InitPki(rogue.path()).ok());
  std::string ca = Read(dir.path() + "/ca.pem");

  grpc::SslServerCredentialsOptions sopts(
      GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  sopts.pem_root_certs = ca;
  sopts.pem_key_cert_pairs.push_back(
      {Read(dir.path() + "/coordinator.key"), Read(dir.path() + "/coordinator.pem")});
  RecordingAdmin service;
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort("127.0.0.1:0", grpc::SslServerCredentials(sopts), &port);
  builder.RegisterService(&service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  ASSERT_NE(server, nullptr);
  ASSERT_GT(port, 0);

  EXPECT_EQ(CallAdmin(port, ca, Read(dir.path() + "/admin.pem"), Read(dir.path() + "/admin.key")),
            grpc::StatusCode::OK);
  EXPECT_EQ(service.last_cn_, "admin");
  EXPECT_EQ(
      CallAdmin(port, ca, Read(dir.path() + "/agent-7.pem"), Read(dir.path() + "/agent-7.key")),
      grpc::StatusCode::OK);
  EXPECT_EQ(service.last_cn_, "agent-7");

  service.last_cn_ = "unset";
  // A client certificate from another CA, or none at all, is refused in the handshake.
  EXPECT_EQ(
      CallAdmin(port, ca, Read(rogue.path() + "/admin.pem"), Read(rogue.path() + "/admin.key")),
      grpc::StatusCode::UNAVAILABLE);
  EXPECT_EQ(CallAdmin(port, ca, "", ""), grpc::StatusCode::UNAVAILABLE);
  // A client that trusts another CA refuses the server.
  EXPECT_EQ(CallAdmin(port, Read(rogue.path() + "/ca.pem"), Read(rogue.path() + "/admin.pem"),
                      Read(rogue.path() + "/admin.key")),
            grpc::StatusCode::UNAVAILABLE);
  EXPECT_EQ(service.last_cn_, "unset");
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
}

// A CSR built by hand: CN and OU as given, signed by a fresh P-256 key.
std::string HandMadeCsr(const std::string& cn, const std::string& ou) {
  EVP_PKEY* key = EVP_EC_gen("P-256");
  X509_REQ* req = X509_REQ_new();
  X509_NAME* name = X509_NAME_new();
  X509_NAME_add_entry_by_txt(name, "OU", MBSTRING_UTF8,
                             reinterpret_cast<const unsigned char*>(ou.c_str()), -1, -1, 0);
  X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_UTF8,
                             reinterpret_cast<const unsigned char*>(cn.c_str()), -1, -1, 0);
  X509_REQ_set_subject_name(req, name);
  X509_REQ_set_pubkey(req, key);
  X509_REQ_sign(req, key, EVP_sha256());
  BIO* bio = BIO_new(BIO_s_mem());
  PEM_write_bio_X509_REQ(bio, req);
  char* data = nullptr;
  long len = BIO_get_mem_data(bio, &data);  // NOLINT(runtime/int)
  std::string pem(data, static_cast<size_t>(len));
  BIO_free(bio);
  X509_NAME_free(name);
  X509_REQ_free(req);
  EVP_PKEY_free(key);
  return pem;
}

TEST(PkiCsr, SignCsrForcesTheRoleAndChecksTheName) {
  TempDir dir;
  ASSERT_TRUE(InitPki(dir.path()).ok());
  auto ca = LoadCa(dir.path() + "/ca.pem", dir.path() + "/ca.key");
  ASSERT_TRUE(ca.ok()) << ca.status();
  // The CSR asks for OU=admin; the certificate says agent.
  auto pem = SignCsr(*ca, HandMadeCsr("site-1", "admin"), "site-1", CertRole::kAgent, 30);
  ASSERT_TRUE(pem.ok()) << pem.status();
  auto id = ReadCertIdentity(*pem);
  ASSERT_TRUE(id.ok());
  EXPECT_EQ(id->common_name, "site-1");
  EXPECT_EQ(id->role, "agent");
  auto not_after = CertNotAfterUnix(*pem);
  ASSERT_TRUE(not_after.ok());
  const int64_t now = static_cast<int64_t>(std::time(nullptr));
  EXPECT_NEAR(static_cast<double>(*not_after - now), 30.0 * 86400, 120);

  EXPECT_THAT(SignCsr(*ca, HandMadeCsr("site-2", "agent"), "site-1", CertRole::kAgent, 30)
                  .status(),
              StatusIs(absl::StatusCode::kPermissionDenied, "expected subject CN 'site-1'"));
  EXPECT_THAT(SignCsr(*ca, "not a csr", "site-1", CertRole::kAgent, 30).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, "BEGIN CERTIFICATE REQUEST"));
  EXPECT_THAT(SignCsr(*ca, HandMadeCsr("site-1", ""), "site-1", CertRole::kServer, 30).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, "client certificates only"));
  // LoadCa refuses a key that is not the CA's.
  TempDir other;
  ASSERT_TRUE(InitPki(other.path()).ok());
  EXPECT_THAT(LoadCa(dir.path() + "/ca.pem", other.path() + "/ca.key").status(),
              StatusIs(absl::StatusCode::kFailedPrecondition, "does not match"));
}

TEST(PkiCsr, GeneratedKeyAndCsrRoundTripAndIssuedCertificateIsChecked) {
  TempDir dir;
  ASSERT_TRUE(InitPki(dir.path()).ok());
  auto ca = LoadCa(dir.path() + "/ca.pem", dir.path() + "/ca.key");
  ASSERT_TRUE(ca.ok());
  auto kc = GenerateKeyAndCsr("site-9");
  ASSERT_TRUE(kc.ok());
  EXPECT_THAT(kc->key_pem, ::testing::HasSubstr("PRIVATE KEY"));
  auto pem = SignCsr(*ca, kc->csr_pem, "site-9", CertRole::kAgent, 10);
  ASSERT_TRUE(pem.ok());
  EXPECT_TRUE(CheckIssuedCertificate(*pem, kc->key_pem, ca->cert_pem, "site-9", CertRole::kAgent)
                  .ok());
  // Another key, another CA, another name or role: each refused.
  auto other_kc = GenerateKeyAndCsr("site-9");
  ASSERT_TRUE(other_kc.ok());
  EXPECT_THAT(CheckIssuedCertificate(*pem, other_kc->key_pem, ca->cert_pem, "site-9",
                                     CertRole::kAgent),
              StatusIs(absl::StatusCode::kPermissionDenied, "not the key generated"));
  TempDir other;
  ASSERT_TRUE(InitPki(other.path()).ok());
  EXPECT_THAT(CheckIssuedCertificate(*pem, kc->key_pem, Read(other.path() + "/ca.pem"), "site-9",
                                     CertRole::kAgent),
              StatusIs(absl::StatusCode::kPermissionDenied, "does not verify"));
  EXPECT_THAT(
      CheckIssuedCertificate(*pem, kc->key_pem, ca->cert_pem, "site-8", CertRole::kAgent),
      StatusIs(absl::StatusCode::kPermissionDenied, "expected CN 'site-8'"));
  EXPECT_THAT(
      CheckIssuedCertificate(*pem, kc->key_pem, ca->cert_pem, "site-9", CertRole::kAdmin),
      StatusIs(absl::StatusCode::kPermissionDenied, "role 'admin'"));
  EXPECT_FALSE(GenerateKeyAndCsr("../evil").ok());
}

TEST(PkiCsr, ReadCsrGivesTheNameAndAStableKeyFingerprint) {
  auto a = GenerateKeyAndCsr("site-x");
  auto b = GenerateKeyAndCsr("site-x");
  ASSERT_TRUE(a.ok() && b.ok());
  auto info = ReadCsr(a->csr_pem);
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->common_name, "site-x");
  EXPECT_EQ(info->key_fingerprint.size(), 64u);
  EXPECT_EQ(ReadCsr(a->csr_pem)->key_fingerprint, info->key_fingerprint);
  EXPECT_NE(ReadCsr(b->csr_pem)->key_fingerprint, info->key_fingerprint) << "a new key";
  EXPECT_EQ(ReadCsr("not a csr").status().code(), absl::StatusCode::kInvalidArgument);
  auto bad_name = GenerateKeyAndCsr("site x");
  if (bad_name.ok()) {
    EXPECT_FALSE(ReadCsr(bad_name->csr_pem).ok());
  }
}

TEST(PkiCsr, IssueCertificateWindowAndFingerprint) {
  TempDir dir;
  ASSERT_TRUE(InitPki(dir.path()).ok());
  const int64_t now = static_cast<int64_t>(std::time(nullptr));
  ASSERT_TRUE(IssueCertificateWindow(dir.path(), "old", CertRole::kAgent, dir.path(),
                                     now - 3 * 86400, now - 86400)
                  .ok());
  const std::string pem = Read(dir.path() + "/old.pem");
  EXPECT_EQ(*CertNotAfterUnix(pem), now - 86400);
  X509Ptr cert = ParseCert(pem);
  EXPECT_LT(X509_cmp_current_time(X509_get0_notAfter(cert.get())), 0) << "already expired";
  EXPECT_THAT(IssueCertificateWindow(dir.path(), "bad", CertRole::kAgent, dir.path(), now, now),
              StatusIs(absl::StatusCode::kInvalidArgument, "not_after > not_before"));
  auto fp = CertFingerprint(pem);
  ASSERT_TRUE(fp.ok());
  EXPECT_EQ(fp->size(), 64u);
  EXPECT_NE(*fp, *CertFingerprint(Read(dir.path() + "/admin.pem")));
}

}  // namespace
}  // namespace fedlora::common
