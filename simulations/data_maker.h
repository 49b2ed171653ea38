#pragma once
// Synthetic federated data: a "clinical notes -> structured fields" task.
//
// Each example is a short patient note (age, sex, blood pressure, one drug
// with dose and frequency, one diagnosis) and its fields in a fixed format:
//   age=54; sex=M; bp=140/90; drug=metformin; dose=500mg; freq=BID; dx=type 2 diabetes
// Sites differ in how their notes are written (feature skew) and mildly in
// which drugs they see (label skew):
//   style 0 (site 0, 3, ...): terse clinician shorthand ("54M DM2. BP 140/90. metformin 500mg BID.")
//   style 1 (site 1, 4, ...): narrative sentences
//   style 2 (site 2, 5, ...): bullet-like key/value lines
// Everything is a pure function of (site, seed): the generator uses
// std::mt19937_64 and no distribution classes, so output is identical on
// every platform. Within a site, no note appears twice (train and held-out
// are disjoint). Thread-safe (no shared state).

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace fedlora::sim {

inline constexpr char kExtractInstruction[] = "Extract the structured fields.";
inline constexpr int kNumNoteStyles = 3;

struct ClinicalRecord {
  int age = 0;
  char sex = 'M';  // 'M' or 'F'
  int systolic = 0;
  int diastolic = 0;
  std::string drug;
  std::string dose;  // e.g. "500mg", "90mcg"
  std::string freq;  // QD, BID, TID, QHS, PRN
  std::string dx;    // diagnosis, lower case except acronyms
};

struct SiteExample {
  std::string instruction;
  std::string input;   // the note
  std::string output;  // FormatFields(record)
};

struct SiteData {
  std::vector<SiteExample> train;
  std::vector<SiteExample> heldout;
};

// "age=..; sex=..; bp=../..; drug=..; dose=..; freq=..; dx=.." (the target line).
std::string FormatFields(const ClinicalRecord& record);
// The note for `record` in `style` (0..kNumNoteStyles-1); `variant` picks a template.
std::string RenderNote(const ClinicalRecord& record, int style, uint64_t variant);
// Style of a site (site % kNumNoteStyles) and its name ("terse", "narrative", "bullets").
int SiteStyle(int site);
const char* StyleName(int style);

// Generates one site's examples (train first, then held-out, all distinct).
// InvalidArgument for negative counts or a negative site.
absl::StatusOr<SiteData> GenerateSite(int site, int num_train, int num_heldout, uint64_t seed);

// Writes <out_dir>/site-<i>/train.jsonl and heldout.jsonl for i in [0, num_sites)
// ({"instruction","input","output"} per line) and <out_dir>/manifest.json.
absl::Status MakeSiteData(const std::string& out_dir, int num_sites, int examples_per_site,
                          int heldout_per_site, uint64_t seed);

// Texts for tokenizer training: every site's training examples as
// edge::FormatInstructionPrompt(instruction, input) + output, plus the bare
// notes and field lines. Deterministic in its arguments.
std::vector<std::string> SyntheticCorpus(int num_sites, int examples_per_site, uint64_t seed);

}  // namespace fedlora::sim
