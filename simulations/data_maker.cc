#include "simulations/data_maker.h"

#include <algorithm>
#include <array>
#include <cctype>
#include <filesystem>
#include <random>
#include <set>
#include <string_view>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/crypto/crypto.h"
#include "common/status/status.h"
#include "edge-agent/data.h"
#include "nlohmann/json.hpp"

namespace fedlora::sim {
namespace {

struct Drug {
  const char* name;
  std::array<const char*, 4> doses;  // nullptr-terminated when fewer
  std::array<const char*, 2> freqs;  // nullptr when only one
  const char* dx;
  const char* dx_short;  // shorthand used by terse notes
};

// Index i belongs to the "preferred" drugs of sites with site % 3 == i % 3.
constexpr Drug kDrugs[] = {
    {"metformin", {"500mg", "850mg", "1000mg", nullptr}, {"BID", "QD"}, "type 2 diabetes", "DM2"},
    {"lisinopril", {"10mg", "20mg", "40mg", nullptr}, {"QD", nullptr}, "hypertension", "HTN"},
    {"atorvastatin", {"10mg", "20mg", "40mg", "80mg"}, {"QHS", "QD"}, "hyperlipidemia", "HLD"},
    {"albuterol", {"90mcg", nullptr, nullptr, nullptr}, {"PRN", nullptr}, "asthma", "asthma"},
    {"sertraline", {"50mg", "100mg", "150mg", nullptr}, {"QD", nullptr}, "depression", "MDD"},
    {"levothyroxine", {"50mcg", "75mcg", "100mcg", nullptr}, {"QD", nullptr}, "hypothyroidism",
     "hypothyroid"},
    {"omeprazole", {"20mg", "40mg", nullptr, nullptr}, {"QD", "BID"}, "GERD", "GERD"},
    {"amoxicillin", {"500mg", "875mg", nullptr, nullptr}, {"TID", "BID"}, "sinusitis", "sinusitis"},
    {"warfarin", {"2mg", "5mg", "7.5mg", nullptr}, {"QD", nullptr}, "atrial fibrillation", "AFib"},
    {"gabapentin", {"300mg", "600mg", nullptr, nullptr}, {"TID", "QHS"}, "neuropathy",
     "neuropathy"},
    {"amlodipine", {"5mg", "10mg", nullptr, nullptr}, {"QD", nullptr}, "hypertension", "HTN"},
    {"metoprolol", {"25mg", "50mg", "100mg", nullptr}, {"BID", "QD"}, "coronary artery disease",
     "CAD"},
};
constexpr int kNumDrugs = sizeof(kDrugs) / sizeof(kDrugs[0]);

class Rng {
 public:
  explicit Rng(uint64_t seed) : engine_(seed) {}
  // Uniform in [lo, hi]; the modulo bias is negligible for these small ranges.
  int Int(int lo, int hi) {
    return lo + static_cast<int>(engine_() % static_cast<uint64_t>(hi - lo + 1));
  }
  uint64_t Next() { return engine_(); }

 private:
  std::mt19937_64 engine_;
};

uint64_t SiteSeed(uint64_t seed, int site) {
  // SplitMix64 finalizer over (seed, site): unrelated streams per site.
  uint64_t z = seed + 0x9E3779B97F4A7C15ull * static_cast<uint64_t>(site + 1);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

int CountNonNull(const char* const* items, int n) {
  int count = 0;
  while (count < n && items[count] != nullptr) ++count;
  return count;
}

ClinicalRecord RandomRecord(Rng& rng, int site) {
  ClinicalRecord r;
  // Label skew: 60% of a site's notes use its preferred third of the drugs.
  int drug_index;
  if (rng.Int(0, 99) < 60) {
    int preferred = site % 3;
    int count = (kNumDrugs - preferred + 2) / 3;
    drug_index = preferred + 3 * rng.Int(0, count - 1);
  } else {
    drug_index = rng.Int(0, kNumDrugs - 1);
  }
  const Drug& drug = kDrugs[drug_index];
  r.age = rng.Int(18, 92);
  r.sex = rng.Int(0, 1) == 0 ? 'M' : 'F';
  r.systolic = rng.Int(98, 182);
  r.diastolic = rng.Int(58, std::min(112, r.systolic - 30));
  r.drug = drug.name;
  r.dose = drug.doses[rng.Int(0, CountNonNull(drug.doses.data(), 4) - 1)];
  r.freq = drug.freqs[rng.Int(0, CountNonNull(drug.freqs.data(), 2) - 1)];
  r.dx = drug.dx;
  return r;
}

const char* DxShort(const ClinicalRecord& r) {
  for (const Drug& d : kDrugs) {
    if (r.dx == d.dx) return d.dx_short;
  }
  return r.dx.c_str();
}

std::string FreqWords(const std::string& freq) {
  if (freq == "QD") return "once daily";
  if (freq == "BID") return "twice daily";
  if (freq == "TID") return "three times daily";
  if (freq == "QHS") return "at bedtime";
  if (freq == "PRN") return "as needed";
  return freq;
}

// "500mg" -> "500 mg".
std::string SpacedDose(const std::string& dose) {
  size_t i = 0;
  while (i < dose.size() && (std::isdigit(static_cast<unsigned char>(dose[i])) || dose[i] == '.')) {
    ++i;
  }
  return absl::StrCat(dose.substr(0, i), " ", dose.substr(i));
}

std::string Terse(const ClinicalRecord& r, uint64_t variant) {
  const char* dx = DxShort(r);
  switch (variant % 3) {
    case 0:
      return absl::StrFormat("%d%c %s. BP %d/%d. %s %s %s.", r.age, r.sex, dx, r.systolic,
                             r.diastolic, r.drug, r.dose, r.freq);
    case 1:
      return absl::StrFormat("%dyo %c w/ %s, BP %d/%d, on %s %s %s", r.age, r.sex, dx, r.systolic,
                             r.diastolic, r.drug, r.dose, r.freq);
    default:
      return absl::StrFormat("Pt %d%c. Hx %s. BP %d/%d. Rx %s %s %s.", r.age, r.sex, dx,
                             r.systolic, r.diastolic, r.drug, r.dose, r.freq);
  }
}

std::string Narrative(const ClinicalRecord& r, uint64_t variant) {
  const bool male = r.sex == 'M';
  const char* noun = male ? "man" : "woman";
  const char* pronoun = male ? "He" : "She";
  const char* possessive = male ? "His" : "Her";
  std::string dose = SpacedDose(r.dose);
  std::string freq = FreqWords(r.freq);
  switch (variant % 3) {
    case 0:
      return absl::StrFormat(
          "The patient is a %d-year-old %s with %s. Blood pressure today was %d/%d. %s takes %s "
          "%s %s.",
          r.age, noun, r.dx, r.systolic, r.diastolic, pronoun, r.drug, dose, freq);
    case 1:
      return absl::StrFormat(
          "A %d-year-old %s was seen in clinic for %s. %s blood pressure measured %d over %d. We "
          "continued %s %s %s.",
          r.age, male ? "male" : "female", r.dx, possessive, r.systolic, r.diastolic, r.drug,
          dose, freq);
    default:
      return absl::StrFormat(
          "%s is %d years old and comes in for follow-up of %s. On exam the blood pressure was "
          "%d/%d. The plan is %s %s %s.",
          male ? "Mr. X" : "Ms. X", r.age, r.dx, r.systolic, r.diastolic, r.drug, dose, freq);
  }
}

std::string Bullets(const ClinicalRecord& r, uint64_t variant) {
  const char* sex_word = r.sex == 'M' ? "male" : "female";
  switch (variant % 3) {
    case 0:
      return absl::StrFormat(
          "- Age: %d\n- Sex: %s\n- BP: %d/%d mmHg\n- Diagnosis: %s\n- Medication: %s %s %s", r.age,
          sex_word, r.systolic, r.diastolic, r.dx, r.drug, r.dose, r.freq);
    case 1:
      return absl::StrFormat(
          "* Patient: %d y, %s\n* Vitals: BP %d/%d\n* Problem: %s\n* Plan: %s %s, %s", r.age,
          sex_word, r.systolic, r.diastolic, r.dx, r.drug, SpacedDose(r.dose), r.freq);
    default:
      return absl::StrFormat("- %d / %c\n- BP %d/%d\n- Dx: %s\n- Rx: %s %s %s", r.age, r.sex,
                             r.systolic, r.diastolic, r.dx, r.drug, r.dose, FreqWords(r.freq));
  }
}

nlohmann::ordered_json ExampleJson(const SiteExample& e) {
  nlohmann::ordered_json j;
  j["instruction"] = e.instruction;
  j["input"] = e.input;
  j["output"] = e.output;
  return j;
}

std::string Jsonl(const std::vector<SiteExample>& examples) {
  std::string out;
  for (const SiteExample& e : examples) {
    out += ExampleJson(e).dump();
    out += '\n';
  }
  return out;
}

}  // namespace

std::string FormatFields(const ClinicalRecord& r) {
  return absl::StrFormat("age=%d; sex=%c; bp=%d/%d; drug=%s; dose=%s; freq=%s; dx=%s", r.age,
                         r.sex, r.systolic, r.diastolic, r.drug, r.dose, r.freq, r.dx);
}

std::string RenderNote(const ClinicalRecord& record, int style, uint64_t variant) {
  switch (((style % kNumNoteStyles) + kNumNoteStyles) % kNumNoteStyles) {
    case 0:
      return Terse(record, variant);
    case 1:
      return Narrative(record, variant);
    default:
      return Bullets(record, variant);
  }
}

int SiteStyle(int site) { return ((site % kNumNoteStyles) + kNumNoteStyles) % kNumNoteStyles; }

const char* StyleName(int style) {
  switch (((style % kNumNoteStyles) + kNumNoteStyles) % kNumNoteStyles) {
    case 0:
      return "terse";
    case 1:
      return "narrative";
    default:
      return "bullets";
  }
}

absl::StatusOr<SiteData> GenerateSite(int site, int num_train, int num_heldout, uint64_t seed) {
  if (site < 0 || num_train < 0 || num_heldout < 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "GenerateSite: expected site >= 0 and counts >= 0, got site %d, %d train, %d held-out",
        site, num_train, num_heldout));
  }
  Rng rng(SiteSeed(seed, site));
  SiteData data;
  std::set<std::string> seen;
  const int style = SiteStyle(site);
  const int64_t wanted = static_cast<int64_t>(num_train) + num_heldout;
  int64_t tries = 0;
  while (static_cast<int64_t>(seen.size()) < wanted) {
    if (++tries > 100 * wanted + 1000) {
      return absl::ResourceExhaustedError(absl::StrFormat(
          "GenerateSite: only %d distinct notes after %d draws for site %d (asked for %d)",
          seen.size(), tries, site, wanted));
    }
    ClinicalRecord record = RandomRecord(rng, site);
    std::string note = RenderNote(record, style, rng.Next());
    if (!seen.insert(note).second) continue;
    SiteExample example{kExtractInstruction, std::move(note), FormatFields(record)};
    if (static_cast<int>(data.train.size()) < num_train) {
      data.train.push_back(std::move(example));
    } else {
      data.heldout.push_back(std::move(example));
    }
  }
  return data;
}

absl::Status MakeSiteData(const std::string& out_dir, int num_sites, int examples_per_site,
                          int heldout_per_site, uint64_t seed) {
  if (num_sites <= 0 || examples_per_site <= 0 || heldout_per_site < 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "MakeSiteData: expected sites > 0, examples > 0, heldout >= 0; got %d, %d, %d", num_sites,
        examples_per_site, heldout_per_site));
  }
  nlohmann::ordered_json manifest;
  manifest["task"] = "clinical notes -> structured fields";
  manifest["instruction"] = kExtractInstruction;
  manifest["seed"] = seed;
  manifest["sites"] = nlohmann::ordered_json::array();
  for (int site = 0; site < num_sites; ++site) {
    ASSIGN_OR_RETURN(SiteData data,
                     GenerateSite(site, examples_per_site, heldout_per_site, seed));
    std::string dir = absl::StrCat(out_dir, "/site-", site);
    std::error_code ec;
    std::filesystem::create_directories(dir, ec);
    if (ec) {
      return absl::PermissionDeniedError(
          absl::StrCat("MakeSiteData: cannot create directory ", dir, ": ", ec.message()));
    }
    RETURN_IF_ERROR(common::WriteFileAtomic(dir + "/train.jsonl", Jsonl(data.train)));
    RETURN_IF_ERROR(common::WriteFileAtomic(dir + "/heldout.jsonl", Jsonl(data.heldout)));
    nlohmann::ordered_json entry;
    entry["site"] = site;
    entry["dir"] = absl::StrCat("site-", site);
    entry["style"] = StyleName(SiteStyle(site));
    entry["train"] = data.train.size();
    entry["heldout"] = data.heldout.size();
    manifest["sites"].push_back(entry);
  }
  return common::WriteFileAtomic(out_dir + "/manifest.json", manifest.dump(2) + "\n");
}

std::vector<std::string> SyntheticCorpus(int num_sites, int examples_per_site, uint64_t seed) {
  std::vector<std::string> corpus;
  for (int site = 0; site < num_sites; ++site) {
    auto data = GenerateSite(site, std::max(examples_per_site, 0), 0, seed);
    if (!data.ok()) continue;  // only for negative arguments, excluded above
    for (const SiteExample& e : data->train) {
      corpus.push_back(edge::FormatInstructionPrompt(e.instruction, e.input) + e.output);
      corpus.push_back(e.input);
      corpus.push_back(e.output);
    }
  }
  return corpus;
}

}  // namespace fedlora::sim
