// Concurrent generations in one engine (one copy of the weights), from C++ threads.
//
//   deepcache-concurrent ENGINE_DIR check [RUNNERS]
//       8 generations of different batch sizes, resolutions, step counts and seeds, first each alone, then all 8
//       at once on 8 threads: each concurrent result must equal its run alone bitwise (tests/test_native.py).
//   deepcache-concurrent ENGINE_DIR time RUNNERS GENERATIONS STEPS
//       GENERATIONS concurrent generations of STEPS steps (batch 1, 16 x 16): prints the wall time per step of
//       one generation and the steps per second of all (bench/native_overhead.py).
//
// ENGINE_DIR is an `aoti` export of a model with inputs (sample, timestep) and a DDIM scheduler config.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <chrono>
#include <fstream>
#include <iostream>
#include <string>
#include <thread>
#include <vector>

#include "engine.h"
#include "scheduler.h"

namespace {

struct Job {
  int64_t batch, size;
  int steps;
  uint64_t seed;
};

struct Result {
  at::Tensor sample;
  std::string history;
};

nlohmann::json scheduler_config(const deepcache::Engine& engine) {
  const auto& m = engine.manifest();
  std::ifstream in(m.directory / m.json.at("scheduler").get<std::string>());
  return deepcache::parse_scheduler_config({std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()});
}

Result run(deepcache::Engine& engine, const nlohmann::json& config, const Job& job) {
  auto scheduler = deepcache::make_scheduler(config, job.steps);
  auto generator = at::make_generator<at::CPUGeneratorImpl>(job.seed);
  auto x = at::randn({job.batch, 1, job.size, job.size}, generator) * scheduler->init_noise_sigma();
  auto generation = engine.generation();
  for (int64_t i = 0; i < scheduler->size(); ++i)
    x = scheduler->step(engine.run(*generation, {scheduler->scale_model_input(x, i), scheduler->timestep(i)}), i, x);
  return {x, generation->history};
}

// Runs `jobs` on one thread each, all at once; returns their results in order.
std::vector<Result> run_threads(deepcache::Engine& engine, const nlohmann::json& config, const std::vector<Job>& jobs) {
  std::vector<Result> results(jobs.size());
  std::vector<std::thread> threads;
  for (size_t i = 0; i < jobs.size(); ++i)
    threads.emplace_back([&, i] { results[i] = run(engine, config, jobs[i]); });
  for (auto& t : threads) t.join();
  return results;
}

int check(deepcache::Engine& engine) {
  const auto config = scheduler_config(engine);
  const std::vector<Job> jobs = {{1, 16, 10, 1}, {2, 8, 7, 2},  {3, 24, 5, 3},  {4, 12, 9, 4},
                                 {1, 32, 6, 5},  {2, 20, 11, 6}, {3, 16, 4, 7}, {1, 28, 8, 8}};
  std::vector<Result> alone;
  for (const auto& job : jobs) alone.push_back(run_threads(engine, config, {job})[0]);  // same thread setup
  const auto together = run_threads(engine, config, jobs);
  int failures = 0;
  for (size_t i = 0; i < jobs.size(); ++i) {
    const bool same = at::equal(alone[i].sample, together[i].sample) && alone[i].history == together[i].history;
    std::cout << (same ? "equal " : "DIFFERENT ") << i << " batch " << jobs[i].batch << " size " << jobs[i].size
              << " steps " << jobs[i].steps << " history " << together[i].history << "\n";
    failures += !same;
  }
  return failures ? 1 : 0;
}

int time(deepcache::Engine& engine, int generations, int steps) {
  const auto config = scheduler_config(engine);
  std::vector<Job> jobs;
  for (int i = 0; i < generations; ++i) jobs.push_back({1, 16, steps, uint64_t(i)});
  run_threads(engine, config, jobs);  // warm-up
  const auto start = std::chrono::steady_clock::now();
  run_threads(engine, config, jobs);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::cout << "{\"generations\": " << generations << ", \"steps\": " << steps << ", \"ms_per_step\": "
            << seconds * 1e3 / steps << ", \"steps_per_second\": " << generations * steps / seconds << "}\n";
  return 0;
}

}  // namespace

int main(int argc, char** argv) try {
  if (argc < 3) {
    std::cerr << "usage: deepcache-concurrent ENGINE_DIR check [RUNNERS] | time RUNNERS GENERATIONS STEPS\n";
    return 2;
  }
  const std::string mode = argv[2];
  const int runners = argc > 3 ? std::stoi(argv[3]) : 1;
  deepcache::Engine engine(argv[1], -1, {}, runners);
  if (mode == "check") return check(engine);
  if (mode == "time" && argc == 6) return time(engine, std::stoi(argv[4]), std::stoi(argv[5]));
  std::cerr << "unknown mode " << mode << "\n";
  return 2;
} catch (const std::exception& err) {
  std::cerr << "deepcache-concurrent: " << err.what() << "\n";
  return 1;
}
