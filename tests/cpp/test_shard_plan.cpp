#include "format/shard_plan.h"

#include <gtest/gtest.h>

#include <string>
#include <vector>

#include <trinity_stream_saver/errors.h>

namespace trinity_stream_saver {
namespace {

// One U8 row per size, named t0, t1, ...: a row's size is its byte count.
std::vector<TensorMeta> rows_of(const std::vector<std::int64_t>& sizes) {
  std::vector<TensorMeta> rows;
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    rows.push_back({"t" + std::to_string(i), "U8", {sizes[i]}});
  }
  return rows;
}

// The plan as lists of tensor names per file.
std::vector<std::vector<std::string>> groups(const ShardPlan& plan) {
  std::vector<std::vector<std::string>> out;
  for (const ShardFile& file : plan.files) {
    std::vector<std::string> names;
    for (const TensorMeta& row : file.tensors) names.push_back(row.name);
    out.push_back(names);
  }
  return out;
}

using Groups = std::vector<std::vector<std::string>>;

TEST(PlanShards, FillsShardsGreedilyInOrder) {
  // The hub's own docstring example: [6, 6, 2, 6, 2, 2] with a limit of 10.
  const ShardPlan plan = plan_shards(rows_of({6, 6, 2, 6, 2, 2}), 10);
  EXPECT_EQ(groups(plan), (Groups{{"t0"}, {"t1", "t2"}, {"t3", "t4", "t5"}}));
}

TEST(PlanShards, ATensorExactlyAtTheLimitFitsAnEmptyShard) {
  EXPECT_EQ(groups(plan_shards(rows_of({10, 10}), 10)), (Groups{{"t0"}, {"t1"}}));
}

TEST(PlanShards, ShardsMayReachTheLimitExactly) {
  EXPECT_EQ(groups(plan_shards(rows_of({4, 6, 1}), 10)), (Groups{{"t0", "t1"}, {"t2"}}));
}

TEST(PlanShards, ATensorOverTheLimitGetsAShardOfItsOwnBeforeTheShardBeingFilled) {
  EXPECT_EQ(groups(plan_shards(rows_of({2, 11, 3}), 10)), (Groups{{"t1"}, {"t0", "t2"}}));
}

TEST(PlanShards, NamesShardsWithFiveDigitNumbers) {
  const ShardPlan plan = plan_shards(rows_of({6, 6}), 10);
  EXPECT_EQ(plan.files[0].filename, "model-00001-of-00002.safetensors");
  EXPECT_EQ(plan.files[1].filename, "model-00002-of-00002.safetensors");
  EXPECT_TRUE(plan.is_sharded());
  EXPECT_EQ(plan.index_filename(), "model.safetensors.index.json");
}

TEST(PlanShards, OneShardIsNamedWithoutSuffix) {
  const ShardPlan plan = plan_shards(rows_of({1, 2}), 10, "weights{suffix}.bin");
  ASSERT_EQ(plan.files.size(), 1u);
  EXPECT_EQ(plan.files[0].filename, "weights.bin");
  EXPECT_FALSE(plan.is_sharded());
}

TEST(PlanShards, AnEmptyStateDictIsOneEmptyFile) {
  const ShardPlan plan = plan_shards({}, 10);
  ASSERT_EQ(plan.files.size(), 1u);
  EXPECT_EQ(plan.files[0].filename, "model.safetensors");
  EXPECT_TRUE(plan.files[0].tensors.empty());
}

TEST(PlanShards, CountsBytesAndParametersOfEveryRow) {
  // F4: torch's packed shape [2, 3] is 6 bytes, 6 torch elements.
  const ShardPlan plan = plan_shards({{"a", "BF16", {2, 3}}, {"b", "F4", {2, 3}}}, 100);
  EXPECT_EQ(plan.total_size, 12u + 6u);
  EXPECT_EQ(plan.total_parameters, 6u + 6u);
  EXPECT_EQ(plan.files[0].bytes, 18u);
}

TEST(PlanShards, ZeroByteTensorsJoinTheShardBeingFilled) {
  EXPECT_EQ(groups(plan_shards(rows_of({0, 0}), 0)), (Groups{{"t0", "t1"}}));
}

TEST(PlanShards, RejectsDuplicateNames) {
  EXPECT_THROW(plan_shards({{"a", "U8", {1}}, {"a", "U8", {1}}}, 10), ValueError);
}

TEST(PlanShards, RejectsPatternsPythonWouldFormatDifferently) {
  for (const std::string pattern : {"model.safetensors", "m{suffix}{suffix}.st", "m{{suffix}}",
                                    "m{suffix}{x}.st", "dir/m{suffix}.st", "{suffix}"}) {
    EXPECT_THROW(plan_shards({}, 10, pattern), ValueError) << pattern;
  }
}

TEST(CheckpointFilenames, AreTheNamesASaveWrites) {
  const std::string pattern = "model{suffix}.safetensors";
  for (const std::string name :
       {"model.safetensors", "model-00001-of-00002.safetensors", "model.safetensors.index.json"}) {
    EXPECT_TRUE(is_checkpoint_filename(pattern, name)) << name;
  }
  // No save writes an index named after a shard: a user's file of that
  // name is not the clean-up's to remove.
  for (const std::string name :
       {"model.safetensors.tmp", "model.safetensors.backup", "model-1-of-2.safetensors",
        "model-0000a-of-00002.safetensors", "other.safetensors", "config.json",
        "model-00001-of-00002.safetensors.tmp", "model-00003-of-00010.safetensors.index.json",
        "model.safetensors.tmp.index.json"}) {
    EXPECT_FALSE(is_checkpoint_filename(pattern, name)) << name;
  }
}

TEST(FileIndices, GivesThePlanIndicesOfTheNamedFilesInTheOrderGiven) {
  const ShardPlan plan = plan_shards(rows_of({6, 6, 6}), 6);
  EXPECT_EQ(file_indices(plan, {"model-00003-of-00003.safetensors",
                                "model-00001-of-00003.safetensors"}),
            (std::vector<std::size_t>{2, 0}));
  EXPECT_TRUE(file_indices(plan, {}).empty());
}

TEST(FileIndices, RejectsANameThatIsNotAFileOfThePlanNamingIt) {
  const ShardPlan plan = plan_shards(rows_of({6, 6}), 6);
  try {
    file_indices(plan, {"model-00001-of-00002.safetensors", "model.safetensors"});
    FAIL() << "expected ValueError";
  } catch (const ValueError& error) {
    EXPECT_NE(std::string(error.what()).find("'model.safetensors' is not a file of the shard plan"),
              std::string::npos)
        << error.what();
  }
}

TEST(FilenamePattern, RefusesNamesOfAnIndexATempFileOrAFolder) {
  for (const std::string pattern :
       {"model{suffix}.safetensors.index.json", "model.index.json{suffix}",
        "model{suffix}.safetensors.tmp", ".{suffix}.", "{suffix}.."}) {
    EXPECT_THROW(plan_shards({}, 10, pattern), ValueError) << pattern;
  }
  EXPECT_NO_THROW(plan_shards({}, 10, "model{suffix}.safetensors"));
}

}  // namespace
}  // namespace trinity_stream_saver
