#include "format/shard_index.h"

#include <gtest/gtest.h>

#include <string>

#include <trinity_stream_saver/errors.h>

namespace trinity_stream_saver {
namespace {

ShardPlan two_files() {
  return plan_shards({{"b.weight", "U8", {6}}, {"a.weight", "U8", {6}}}, 10);
}

TEST(ShardIndexJson, IsWhatJsonDumpsWithIndent2AndSortedKeysPrints) {
  // Python: json.dumps(index, indent=2, sort_keys=True) + "\n"
  EXPECT_EQ(shard_index_json(two_files(), 12, std::nullopt),
            "{\n"
            "  \"metadata\": {\n"
            "    \"total_parameters\": 12,\n"
            "    \"total_size\": 12\n"
            "  },\n"
            "  \"weight_map\": {\n"
            "    \"a.weight\": \"model-00002-of-00002.safetensors\",\n"
            "    \"b.weight\": \"model-00001-of-00002.safetensors\"\n"
            "  }\n"
            "}\n");
}

TEST(ShardIndexJson, SortsUserMetadataWithTheTotalsAndEscapesAsJsonDumps) {
  const std::string json =
      shard_index_json(two_files(), 12, Metadata{{"z", "caf\xc3\xa9"}, {"a", "\"q\""}});
  EXPECT_NE(json.find("  \"metadata\": {\n"
                      "    \"a\": \"\\\"q\\\"\",\n"
                      "    \"total_parameters\": 12,\n"
                      "    \"total_size\": 12,\n"
                      "    \"z\": \"caf\\u00e9\"\n"
                      "  },"),
            std::string::npos)
      << json;
}

TEST(ShardIndexJson, RejectsUserMetadataThatWouldHideTheTotals) {
  EXPECT_THROW(shard_index_json(two_files(), 1, Metadata{{"total_size", "0"}}), ValueError);
}

TEST(ShardFileMetadata, IsFormatPtAloneForShards) {
  EXPECT_EQ(shard_file_metadata(two_files(), Metadata{{"k", "v"}}), (Metadata{{"format", "pt"}}));
}

TEST(ShardFileMetadata, TakesTheUsersMetadataForASingleFileAsDictUpdateDoes) {
  const ShardPlan single = plan_shards({{"a", "U8", {1}}}, 10);
  EXPECT_EQ(shard_file_metadata(single, Metadata{{"k", "v"}, {"format", "np"}}),
            (Metadata{{"format", "np"}, {"k", "v"}}));
}

}  // namespace
}  // namespace trinity_stream_saver
