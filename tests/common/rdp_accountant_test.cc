#include "common/privacy/rdp_accountant.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <vector>

namespace fedlora::common {
namespace {

using ::testing::HasSubstr;

std::vector<double> Range(int from, int to) {  // [from, to)
  std::vector<double> v;
  for (int i = from; i < to; ++i) v.push_back(i);
  return v;
}

RdpAccountant MakeAccountant(const std::vector<double>& orders, EpsilonConversion conversion) {
  auto acc = RdpAccountant::Create(orders, conversion);
  EXPECT_TRUE(acc.ok()) << acc.status();
  return *acc;
}

double Epsilon(double q, double sigma, uint64_t steps, const std::vector<double>& orders,
               double delta, EpsilonConversion conversion, double* order = nullptr) {
  RdpAccountant acc = MakeAccountant(orders, conversion);
  absl::Status s = acc.AddRound({q, sigma, steps});
  EXPECT_TRUE(s.ok()) << s;
  auto eps = acc.EpsilonFor(delta);
  EXPECT_TRUE(eps.ok()) << eps.status();
  if (order != nullptr) *order = eps->order;
  return eps->epsilon;
}

// Independent reference: log A_alpha = log E_{z~N(0,s^2)}[((1-q) + q exp((2z-1)/(2 s^2)))^alpha]
// by the trapezoid rule in log space on a grid of step sigma/16 covering both
// modes (z ~ 0 and z ~ alpha) by 40 sigma; smooth Gaussian-like integrands make
// the trapezoid rule converge spectrally.
double LogAByIntegration(double q, double sigma, double alpha) {
  const double lo = -40 * sigma - 2;
  const double hi = std::max(alpha, 1.0) + 40 * sigma + 2;
  const double h = sigma / 16;
  const auto n = static_cast<int64_t>(std::ceil((hi - lo) / h));
  std::vector<double> log_f(n + 1);
  double max_log = -std::numeric_limits<double>::infinity();
  for (int64_t k = 0; k <= n; ++k) {
    const double z = lo + h * static_cast<double>(k);
    const double log_mu0 = -z * z / (2 * sigma * sigma) - std::log(sigma * std::sqrt(2 * M_PI));
    // log((1-q) + q e^x) computed stably.
    const double x = (2 * z - 1) / (2 * sigma * sigma);
    const double a = std::log1p(-q);
    const double b = std::log(q) + x;
    const double mix = std::max(a, b) + std::log1p(std::exp(std::min(a, b) - std::max(a, b)));
    log_f[k] = log_mu0 + alpha * mix;
    max_log = std::max(max_log, log_f[k]);
  }
  long double sum = 0;
  for (int64_t k = 0; k <= n; ++k) {
    const long double w = (k == 0 || k == n) ? 0.5L : 1.0L;
    sum += w * std::exp(static_cast<long double>(log_f[k] - max_log));
  }
  return max_log + std::log(static_cast<double>(sum) * h);
}

// --- Closed forms -----------------------------------------------------------

TEST(RdpAccountantTest, NoSamplingIsTheGaussianMechanism) {
  // q = 1: RDP of the Gaussian mechanism, alpha / (2 sigma^2) (Mironov 2017,
  // Prop. 7). TF-Privacy rdp_accountant_test.py test_compute_rdp_no_sampling:
  // compute_rdp(q=1, noise_multiplier=10, steps=1, orders=20) == 0.1.
  auto r = SampledGaussianRdp(1.0, 10, 20);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_DOUBLE_EQ(*r, 0.1);
  for (double sigma : {0.5, 1.1, 2.71828, 7.0}) {
    for (double alpha : {1.5, 2.0, 3.14159, 32.0, 255.5}) {
      auto v = SampledGaussianRdp(1.0, sigma, alpha);
      ASSERT_TRUE(v.ok());
      EXPECT_NEAR(*v, alpha / (2 * sigma * sigma), 1e-12 * alpha) << sigma << " " << alpha;
    }
  }
}

TEST(RdpAccountantTest, NoDataAndNoNoise) {
  // TF-Privacy test_compute_rdp_no_data: q = 0 costs nothing.
  EXPECT_EQ(*SampledGaussianRdp(0.0, 10, 20), 0.0);
  EXPECT_TRUE(std::isinf(*SampledGaussianRdp(0.01, 0.0, 20)));
}

// --- Published values (TF-Privacy) ----------------------------------------

TEST(RdpAccountantTest, TfPrivacyScalarRdp) {
  // TF-Privacy privacy/analysis/rdp_accountant_test.py, test_compute_rdp_scalar:
  // compute_rdp(q=0.1, noise_multiplier=2, steps=10, orders=5) ~= 0.07737 (5 places).
  RdpAccountant acc = MakeAccountant({5.0}, EpsilonConversion::kClassic);
  ASSERT_TRUE(acc.AddRound({0.1, 2.0, 10}).ok());
  EXPECT_NEAR(acc.rdp()[0], 0.07737, 5e-6);
}

TEST(RdpAccountantTest, TfPrivacyRdpSequenceIntegerAndFractionalOrders) {
  // TF-Privacy rdp_accountant_test.py, test_compute_rdp_sequence: q=0.01,
  // sigma=2.5, 50 steps, orders [1.5, 2.5, 5, 50, 100] ->
  // [0.00065, 0.001085, 0.00218075, 0.023846, 167.416307] (delta=1e-5); the
  // same figures to rtol 1e-4 in google/differential-privacy dp_accounting
  // rdp_privacy_accountant_test.py (6.5007e-04, 1.0854e-03, 2.1808e-03,
  // 2.3846e-02, 1.6742e+02).
  const std::vector<double> orders = {1.5, 2.5, 5, 50, 100};
  const std::vector<double> expected = {0.00065, 0.001085, 0.00218075, 0.023846, 167.416307};
  const std::vector<double> expected_dp_accounting = {6.5007e-04, 1.0854e-03, 2.1808e-03,
                                                      2.3846e-02, 1.6742e+02};
  RdpAccountant acc = MakeAccountant(orders, EpsilonConversion::kImproved);
  ASSERT_TRUE(acc.AddRound({0.01, 2.5, 50}).ok());
  for (size_t i = 0; i < orders.size(); ++i) {
    EXPECT_NEAR(acc.rdp()[i], expected[i], 1e-5) << "order " << orders[i];
    EXPECT_NEAR(acc.rdp()[i], expected_dp_accounting[i], 1e-4 * expected_dp_accounting[i])
        << "order " << orders[i];
  }
}

TEST(RdpAccountantTest, AbadiEtAl2016SettingClassicConversion) {
  // Abadi et al. 2016, "Deep Learning with Differential Privacy", Sec. 3.1:
  // q = 0.01, sigma = 4, T = 10000 steps gives (1.26, 1e-5)-DP with the moments
  // accountant. TF-Privacy rdp_accountant_test.py
  // test_get_privacy_spent_check_target_delta pins the RDP figure for the same
  // setting: orders 2..32, classic conversion, eps = 1.258575 at order 20.
  double order = 0;
  const double eps =
      Epsilon(0.01, 4, 10000, Range(2, 33), 1e-5, EpsilonConversion::kClassic, &order);
  EXPECT_NEAR(eps, 1.258575, 5e-6);
  EXPECT_EQ(order, 20);
  EXPECT_NEAR(eps, 1.26, 0.005);  // Abadi et al.'s rounded figure
  // The improved conversion can only be tighter.
  EXPECT_LT(Epsilon(0.01, 4, 10000, Range(2, 33), 1e-5, EpsilonConversion::kImproved), eps);
}

TEST(RdpAccountantTest, TfPrivacyHeterogeneousComposition) {
  // TF-Privacy rdp_accountant_test.py test_check_composition: 40000 steps of
  // (q=1e-4, sigma=0.4) then 100 steps of (q=0.1, sigma=2), listed orders,
  // classic conversion, delta=1e-5 -> eps = 8.509656 at order 2.5.
  const std::vector<double> orders = {1.25, 1.5, 1.75, 2., 2.5, 3., 4., 5., 6., 7., 8.,
                                      10.,  12., 14.,  16., 20., 24., 28., 32., 64., 256.};
  RdpAccountant acc = MakeAccountant(orders, EpsilonConversion::kClassic);
  ASSERT_TRUE(acc.AddRound({1e-4, 0.4, 40000}).ok());
  ASSERT_TRUE(acc.AddRound({0.1, 2, 100}).ok());
  auto eps = acc.EpsilonFor(1e-5);
  ASSERT_TRUE(eps.ok());
  EXPECT_NEAR(eps->epsilon, 8.509656, 5e-6);
  EXPECT_EQ(eps->order, 2.5);
  EXPECT_EQ(acc.rounds(), 2u);
  EXPECT_EQ(acc.total_steps(), 40100u);
}

TEST(RdpAccountantTest, TfPrivacyMnistTutorialFigures) {
  // TF-Privacy tutorials/README.md (MNIST, N = 60000, batch 256, delta = 1e-5,
  // printed with 2 decimals, classic conversion as the tutorial used then).
  const double q = 256.0 / 60000;
  // (a) "compute_dp_sgd_privacy.py --N=60000 --batch_size=256
  //     --noise_multiplier=1.1 --epochs=60 --delta=1e-5 ... satisfies differential
  //     privacy with eps = 3.01": steps = ceil(60 * 60000 / 256) = 14063 and that
  //     script's orders [1.25, 1.5, 1.75, 2, 2.25, 2.5, 3, 3.5, 4, 4.5] + 5..63 +
  //     [128, 256, 512]. Its docstring: noise_multiplier 1.12 -> (2.92, 1e-5).
  std::vector<double> script_orders = {1.25, 1.5, 1.75, 2., 2.25, 2.5, 3., 3.5, 4., 4.5};
  for (int a = 5; a < 64; ++a) script_orders.push_back(a);
  for (double a : {128, 256, 512}) script_orders.push_back(a);
  EXPECT_NEAR(Epsilon(q, 1.1, 14063, script_orders, 1e-5, EpsilonConversion::kClassic), 3.01,
              0.005);
  EXPECT_NEAR(Epsilon(q, 1.12, 14063, script_orders, 1e-5, EpsilonConversion::kClassic), 2.92,
              0.005);
  // (b) mnist_dpsgd_tutorial.py: orders 1.1..10.9 step 0.1 and 12..63 (our
  //     DefaultOrders()), 60000 // 256 = 234 steps per epoch. README: sigma 1.1
  //     prints 1.03 after 1 epoch, 1.11 after 2, 3.01 after 60; the "Select
  //     Parameters" table: sigma 1.3 / 15 epochs -> 1.19, sigma 0.7 / 45 epochs
  //     -> 7.10. The earlier README (sigma 1.12 default) printed 1.00, 1.04 and
  //     2.92, and its table sigma 1.2 / 10 epochs -> 1.20.
  const std::vector<double> tut = RdpAccountant::DefaultOrders();
  struct Row {
    double sigma;
    int epochs;
    double eps;
  };
  for (const Row& row : {Row{1.1, 1, 1.03}, Row{1.1, 2, 1.11}, Row{1.1, 60, 3.01},
                         Row{1.3, 15, 1.19}, Row{0.7, 45, 7.10}, Row{1.12, 1, 1.00},
                         Row{1.12, 2, 1.04}, Row{1.12, 60, 2.92}, Row{1.2, 10, 1.20}}) {
    EXPECT_NEAR(Epsilon(q, row.sigma, 234 * row.epochs, tut, 1e-5, EpsilonConversion::kClassic),
                row.eps, 0.005)
        << "sigma " << row.sigma << ", " << row.epochs << " epochs";
  }
}

TEST(RdpAccountantTest, TfPrivacyMnistPerEpochAccountingComposes) {
  // Accounting epoch by epoch (234 steps each) equals accounting 60 epochs at once.
  const double q = 256.0 / 60000;
  RdpAccountant per_epoch;
  for (int e = 0; e < 60; ++e) ASSERT_TRUE(per_epoch.AddRound({q, 1.1, 234}).ok());
  RdpAccountant at_once;
  ASSERT_TRUE(at_once.AddRound({q, 1.1, 60 * 234}).ok());
  for (size_t i = 0; i < at_once.rdp().size(); ++i) {
    EXPECT_NEAR(per_epoch.rdp()[i], at_once.rdp()[i], 1e-9 * at_once.rdp()[i]);
  }
}

// --- Published values (dp_accounting, improved conversion) ------------------

TEST(RdpAccountantTest, DpAccountingPureDpImprovedConversion) {
  // google/differential-privacy python/dp_accounting/rdp/rdp_privacy_accountant_test.py
  // test_compute_epsilon_delta_pure_dp: constant RDP 1.1 at orders 2..32,
  // delta = 1e-5 -> epsilon 1.32783806176 at order 32 ("computed by hand").
  const std::vector<double> orders = Range(2, 33);
  const std::vector<double> rdp(orders.size(), 1.1);
  auto eps = EpsilonFromRdp(orders, rdp, 1e-5, EpsilonConversion::kImproved);
  ASSERT_TRUE(eps.ok());
  EXPECT_NEAR(eps->epsilon, 1.32783806176, 1e-9);
  EXPECT_EQ(eps->order, 32);
  // Classic: 1.1 + log(1e5) / 31.
  auto classic = EpsilonFromRdp(orders, rdp, 1e-5, EpsilonConversion::kClassic);
  ASSERT_TRUE(classic.ok());
  EXPECT_NEAR(classic->epsilon, 1.1 + std::log(1e5) / 31, 1e-12);
}

TEST(RdpAccountantTest, DpAccountingGaussianCalibratedToEpsilonOne) {
  // dp_accounting rdp_privacy_accountant_test.py test_compute_epsilon_delta_gaussian:
  // q = 1, sigma = 4.530877117 "chosen to obtain exactly (1, 1e-6)-DP" over
  // orders 1.000, 1.001, ..., 99.999 with the improved conversion (order 1.0
  // itself is left out here: orders must exceed 1).
  std::vector<double> orders;
  for (int i = 1001; i < 100000; ++i) orders.push_back(0.001 * i);
  RdpAccountant acc = MakeAccountant(orders, EpsilonConversion::kImproved);
  ASSERT_TRUE(acc.AddRound({1.0, 4.530877117, 1}).ok());
  auto eps = acc.EpsilonFor(1e-6);
  ASSERT_TRUE(eps.ok());
  EXPECT_NEAR(eps->epsilon, 1.0, 1e-7);
}

// --- Independent numerical check of both series ------------------------------

TEST(RdpAccountantTest, SeriesMatchNumericalIntegration) {
  // Parameter grid of TF-Privacy's test_compute_log_a_equals_mp (extreme q,
  // sigma, integer and fractional orders), plus a few ordinary ones; the
  // reference here is our own quadrature, not a published figure.
  struct Case {
    double q, sigma, order;
  };
  for (const Case& c : {Case{1e-7, .1, 1.01}, Case{1e-6, .1, 256}, Case{1e-5, .1, 256.1},
                        Case{1e-6, 1, 27}, Case{1e-4, 1., 1.5}, Case{1e-3, 1., 2},
                        Case{.01, 10, 20}, Case{.1, 100, 20.5}, Case{.99, .1, 256},
                        Case{.999, 100, 256.1}, Case{0.3, 0.7, 3.7}, Case{0.05, 1.5, 12.3},
                        Case{0.05, 1.5, 12}}) {
    auto rdp = SampledGaussianRdp(c.q, c.sigma, c.order);
    ASSERT_TRUE(rdp.ok());
    const double log_a = *rdp * (c.order - 1);
    const double ref = LogAByIntegration(c.q, c.sigma, c.order);
    EXPECT_NEAR(log_a, ref, 1e-6 * std::fabs(ref) + 1e-14)
        << "q=" << c.q << " sigma=" << c.sigma << " order=" << c.order;
  }
}

TEST(RdpAccountantTest, FractionalOrdersInterpolateIntegerOnes) {
  // The fractional series approaches the integer formula from both sides.
  for (double a : {2.0, 5.0, 17.0}) {
    const double at = *SampledGaussianRdp(0.02, 1.3, a);
    EXPECT_NEAR(*SampledGaussianRdp(0.02, 1.3, a - 1e-7), at, 1e-5 * at);
    EXPECT_NEAR(*SampledGaussianRdp(0.02, 1.3, a + 1e-7), at, 1e-5 * at);
  }
}

// --- Accountant behaviour ----------------------------------------------------

TEST(RdpAccountantTest, EpsilonGrowsWithRoundsAndStartsAtZero) {
  RdpAccountant acc;
  EXPECT_EQ(acc.conversion(), EpsilonConversion::kImproved);
  EXPECT_EQ(acc.orders().size(), 99u + 52u);
  EXPECT_EQ(acc.EpsilonFor(1e-5)->epsilon, 0.0);
  double last = 0;
  for (int r = 0; r < 20; ++r) {
    ASSERT_TRUE(acc.AddRound({0.1, 1.0, 1}).ok());
    const double eps = acc.EpsilonFor(1e-5)->epsilon;
    EXPECT_GT(eps, last);
    last = eps;
  }
  EXPECT_EQ(acc.rounds(), 20u);
}

TEST(RdpAccountantTest, WouldExceedMatchesEpsilonAfterAndChangesNothing) {
  RdpAccountant acc;
  const SampledGaussianRound round{0.05, 1.0, 1};
  for (int r = 0; r < 10; ++r) ASSERT_TRUE(acc.AddRound(round).ok());
  const double now = acc.EpsilonFor(1e-5)->epsilon;
  const double after = acc.EpsilonAfter(round, 1e-5)->epsilon;
  ASSERT_GT(after, now);
  const std::string before_json = acc.ToJson();
  EXPECT_TRUE(*acc.WouldExceed((now + after) / 2, 1e-5, round));
  EXPECT_FALSE(*acc.WouldExceed(after * 1.0001, 1e-5, round));
  EXPECT_EQ(acc.ToJson(), before_json);
  // After committing, the accountant reports what EpsilonAfter predicted.
  ASSERT_TRUE(acc.AddRound(round).ok());
  EXPECT_DOUBLE_EQ(acc.EpsilonFor(1e-5)->epsilon, after);
  // A round without noise always exceeds, and cannot be recorded.
  EXPECT_TRUE(*acc.WouldExceed(1e9, 1e-5, {0.05, 0.0, 1}));
  EXPECT_THAT(acc.AddRound({0.05, 0.0, 1}).message(), HasSubstr("no privacy"));
}

TEST(RdpAccountantTest, ImprovedConversionNeverLooser) {
  for (double sigma : {0.7, 1.0, 2.0, 5.0}) {
    for (uint64_t steps : {1, 10, 1000}) {
      const auto orders = RdpAccountant::DefaultOrders();
      EXPECT_LE(Epsilon(0.01, sigma, steps, orders, 1e-6, EpsilonConversion::kImproved),
                Epsilon(0.01, sigma, steps, orders, 1e-6, EpsilonConversion::kClassic) + 1e-12);
    }
  }
}

TEST(RdpAccountantTest, JsonRoundTripIsExact) {
  auto acc = RdpAccountant::Create({1.5, 2.0, 3.3, 32.0}, EpsilonConversion::kClassic);
  ASSERT_TRUE(acc.ok());
  ASSERT_TRUE(acc->AddRound({0.013, 1.7, 3}).ok());
  ASSERT_TRUE(acc->AddRound({0.2, 0.9, 1}).ok());
  auto back = RdpAccountant::FromJson(acc->ToJson());
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->orders(), acc->orders());
  EXPECT_EQ(back->rdp(), acc->rdp());  // bit-exact doubles
  EXPECT_EQ(back->conversion(), EpsilonConversion::kClassic);
  EXPECT_EQ(back->rounds(), 2u);
  EXPECT_EQ(back->total_steps(), 4u);
  EXPECT_EQ(back->EpsilonFor(1e-5)->epsilon, acc->EpsilonFor(1e-5)->epsilon);
  EXPECT_EQ(back->ToJson(), acc->ToJson());
}

TEST(RdpAccountantTest, OverflowedOrdersRoundTripAndDropOut) {
  // sigma = 1e-154: 1 / (2 sigma^2) = 5e307, so a / (2 sigma^2) is finite at
  // order 2 (1e308) and overflows at order 4.
  auto acc = RdpAccountant::Create({2.0, 4.0}, EpsilonConversion::kClassic);
  ASSERT_TRUE(acc.ok());
  ASSERT_TRUE(acc->AddRound({1.0, 1e-154, 1}).ok());
  EXPECT_TRUE(std::isfinite(acc->rdp()[0]));
  EXPECT_TRUE(std::isinf(acc->rdp()[1]));
  EXPECT_EQ(acc->EpsilonFor(1e-5)->order, 2.0);
  auto back = RdpAccountant::FromJson(acc->ToJson());
  ASSERT_TRUE(back.ok()) << back.status() << " " << acc->ToJson();
  EXPECT_EQ(back->rdp(), acc->rdp());
}

TEST(RdpAccountantTest, RejectsBadJson) {
  const std::string good = RdpAccountant().ToJson();
  EXPECT_TRUE(RdpAccountant::FromJson(good).ok());
  struct Bad {
    std::string json;
    std::string message;
  };
  for (const Bad& b : std::vector<Bad>{
           {"not json", "not a JSON object"},
           {"[1,2]", "not a JSON object"},
           {R"({"conversion":"classic","orders":[2],"rdp":[0],"rounds":0,"steps":0})",
            "missing field 'version'"},
           {R"({"version":2,"conversion":"classic","orders":[2],"rdp":[0],"rounds":0,"steps":0})",
            "'version' must be 1"},
           {R"({"version":1,"conversion":"exact","orders":[2],"rdp":[0],"rounds":0,"steps":0})",
            "'conversion'"},
           {R"({"version":1,"conversion":"classic","orders":[2,3],"rdp":[0],"rounds":0,"steps":0})",
            "2 orders but 1 rdp values"},
           {R"({"version":1,"conversion":"classic","orders":[1],"rdp":[0],"rounds":0,"steps":0})",
            "orders[0]"},
           {R"({"version":1,"conversion":"classic","orders":[2,2],"rdp":[0,0],"rounds":0,"steps":0})",
            "duplicate"},
           {R"({"version":1,"conversion":"classic","orders":[2],"rdp":[-1],"rounds":0,"steps":0})",
            "'rdp[0]'"},
           {R"({"version":1,"conversion":"classic","orders":[2],"rdp":["x"],"rounds":0,"steps":0})",
            "'rdp[0]' must be a number"},
           {R"({"version":1,"conversion":"classic","orders":[2],"rdp":[0],"rounds":-1,"steps":0})",
            "'rounds'"},
       }) {
    auto r = RdpAccountant::FromJson(b.json);
    ASSERT_FALSE(r.ok()) << b.json;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(r.status().message(), HasSubstr(b.message)) << b.json;
  }
}

TEST(RdpAccountantTest, RejectsBadParametersAndKeepsState) {
  RdpAccountant acc;
  ASSERT_TRUE(acc.AddRound({0.1, 1.0, 1}).ok());
  const std::string before = acc.ToJson();
  EXPECT_THAT(acc.AddRound({1.5, 1.0, 1}).message(), HasSubstr("sampling_rate"));
  EXPECT_THAT(acc.AddRound({-0.1, 1.0, 1}).message(), HasSubstr("sampling_rate"));
  EXPECT_THAT(acc.AddRound({0.1, -1.0, 1}).message(), HasSubstr("noise_multiplier"));
  EXPECT_THAT(acc.AddRound({0.1, std::nan(""), 1}).message(), HasSubstr("noise_multiplier"));
  EXPECT_EQ(acc.ToJson(), before);
  EXPECT_THAT(acc.EpsilonFor(0).status().message(), HasSubstr("delta"));
  EXPECT_THAT(acc.EpsilonFor(1).status().message(), HasSubstr("delta"));
  EXPECT_THAT(acc.WouldExceed(0, 1e-5, {0.1, 1, 1}).status().message(),
              HasSubstr("budget epsilon"));
  EXPECT_FALSE(RdpAccountant::Create({}, EpsilonConversion::kClassic).ok());
  EXPECT_FALSE(RdpAccountant::Create({1.0}, EpsilonConversion::kClassic).ok());
  EXPECT_FALSE(
      RdpAccountant::Create({std::numeric_limits<double>::infinity()}, EpsilonConversion::kClassic)
          .ok());
  EXPECT_FALSE(SampledGaussianRdp(0.1, 1, 0.5).ok());
  EXPECT_FALSE(EpsilonFromRdp({2, 3}, {0.1}, 1e-5, EpsilonConversion::kClassic).ok());
}

}  // namespace
}  // namespace fedlora::common
