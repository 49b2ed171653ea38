#include "coordinator/export_version.h"

#include <optional>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/crypto/crypto.h"
#include "common/quant/quant.h"
#include "common/status/status.h"

namespace fedlora::coordinator {

absl::StatusOr<LoadedAdapter> LoadVersionAdapter(const StateStore& store,
                                                 const std::string& version) {
  LoadedAdapter loaded;
  if (version.empty() || version == "latest" || version == "current") {
    ASSIGN_OR_RETURN(loaded.version_id, store.CurrentVersion());
    if (loaded.version_id.empty()) {
      return absl::NotFoundError(absl::StrCat("export: version '",
                                              version.empty() ? "latest" : version,
                                              "': no version has been published yet"));
    }
  } else {
    loaded.version_id = version;
  }
  const std::string& id = loaded.version_id;
  ASSIGN_OR_RETURN(std::optional<VersionRecord> record, store.GetVersion(id));
  if (!record.has_value()) {
    return absl::NotFoundError(absl::StrCat("export: version '", id, "' not found"));
  }
  auto blob = store.GetBlob(record->sha256);
  if (absl::IsNotFound(blob.status())) {
    return absl::DataLossError(absl::StrCat("export: version ", id, ": its blob ", record->sha256,
                                            " is missing from the store"));
  }
  RETURN_IF_ERROR(blob.status());
  const std::string actual = common::Sha256Hex(*blob);
  if (actual != record->sha256) {
    return absl::DataLossError(absl::StrCat("export: version ", id, ": blob SHA-256 expected ",
                                            record->sha256, ", found ", actual));
  }
  auto tensors = common::DecodeAdapterBlob(*blob, &loaded.metadata);
  if (!tensors.ok()) {
    return absl::DataLossError(
        absl::StrCat("export: version ", id, ": ", tensors.status().message()));
  }
  loaded.tensors = std::move(*tensors);
  if (loaded.tensors.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("export: version ", id, " has no tensors"));
  }

  auto config = common::LoraConfigFromBlobMetadata(loaded.tensors, loaded.metadata);
  if (!config.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("export: version ", id, ": ", config.status().message()));
  }
  loaded.config = std::move(*config);
  return loaded;
}

absl::StatusOr<ExportResult> ExportVersion(const StateStore& store, const ExportOptions& options) {
  common::AdapterExportOptions export_options;
  export_options.format = options.format;
  export_options.base_model_dir = options.base_model_dir;
  export_options.quant = options.quant;
  export_options.out = options.out;
  export_options.base_flag = "--base-model";
  // Bad options are reported before the store is read.
  RETURN_IF_ERROR(common::CheckExportOptions(export_options).status());
  ASSIGN_OR_RETURN(LoadedAdapter loaded, LoadVersionAdapter(store, options.version));
  export_options.name = "fedlora " + loaded.version_id;
  ASSIGN_OR_RETURN(common::AdapterExportResult written,
                   common::ExportAdapter(loaded.tensors, loaded.config, export_options));
  ExportResult result;
  result.version_id = loaded.version_id;
  result.out = written.out;
  result.tensor_count = written.tensor_count;
  result.config = std::move(loaded.config);
  if (!options.base_model_dir.empty()) result.config.base_model_name_or_path = options.base_model_dir;
  return result;
}

absl::StatusOr<ExportResult> ExportVersionFromDataDir(const std::string& data_dir,
                                                      const ExportOptions& options) {
  ASSIGN_OR_RETURN(std::unique_ptr<StateStore> store, StateStore::OpenReadOnly(data_dir));
  return ExportVersion(*store, options);
}

}  // namespace fedlora::coordinator
