#include "scheduler.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <set>
#include <stdexcept>

namespace deepcache {
namespace {

using nlohmann::json;

// What one class reads from its config: the keys it implements, the keys whose feature it does not implement
// (they must hold the value that turns the feature off), and the keys only such a feature reads.
struct Keys {
  std::set<std::string> implemented;
  std::map<std::string, json> off;
  std::set<std::string> unused;  // read by diffusers only where an `off` feature is on
};

bool own(const Keys& keys, const std::string& key) {
  return keys.implemented.count(key) || keys.off.count(key) || keys.unused.count(key);
}

// Keys of the other schedulers: diffusers' from_config carries them across classes (an Euler config made from
// SD's PNDM/DDIM one holds clip_sample, set_alpha_to_one, skip_prk_steps) and the class ignores them.
bool foreign(const std::string& key);

void check_keys(const json& config, const std::string& cls, const Keys& keys) {
  for (const auto& [key, value] : config.items()) {
    if (key.rfind('_', 0) == 0 || keys.implemented.count(key) || keys.unused.count(key)) continue;
    if (!own(keys, key) && foreign(key)) continue;
    auto off = keys.off.find(key);
    if (off == keys.off.end())
      throw std::invalid_argument("scheduler config key '" + key + "' is not implemented by the C++ " + cls +
                                  ": remove it, or run this generation in Python");
    if (value != off->second)
      throw std::invalid_argument("scheduler config " + key + "=" + value.dump() + " is not implemented by the C++ " +
                                  cls + " (it runs " + key + "=" + off->second.dump() +
                                  "): change it, or run this generation in Python");
  }
}

// A number, or the strings parse_scheduler_config makes of Python's Infinity/-Infinity.
double number(const json& config, const std::string& key, double fallback) {
  if (!config.contains(key) || config[key].is_null()) return fallback;
  const auto& v = config[key];
  if (v.is_string()) {
    if (v == "Infinity") return std::numeric_limits<double>::infinity();
    if (v == "-Infinity") return -std::numeric_limits<double>::infinity();
    throw std::invalid_argument("scheduler config " + key + "=" + v.dump() + " is not a number");
  }
  return v.get<double>();
}

std::string choice(const json& config, const std::string& key, const std::string& fallback,
                   const std::vector<std::string>& supported, const std::string& cls) {
  auto value = config.value(key, fallback);
  if (std::find(supported.begin(), supported.end(), value) == supported.end()) {
    std::string names;
    for (const auto& s : supported) names += (names.empty() ? "" : ", ") + s;
    throw std::invalid_argument("scheduler config " + key + "=\"" + value + "\" is not implemented by the C++ " + cls +
                                " (it implements " + names + ")");
  }
  return value;
}

// betas -> alphas_cumprod, float32 as diffusers keeps them.
at::Tensor alphas_cumprod(const json& config, const std::string& cls) {
  const int64_t train = config.value("num_train_timesteps", 1000);
  at::Tensor betas;
  if (config.contains("trained_betas") && !config["trained_betas"].is_null()) {
    betas = at::tensor(config["trained_betas"].get<std::vector<double>>(), at::kDouble).to(at::kFloat);
  } else {
    const auto schedule = choice(config, "beta_schedule", "linear", {"linear", "scaled_linear", "squaredcos_cap_v2"},
                                 cls);
    const double start = number(config, "beta_start", 0.0001), end = number(config, "beta_end", 0.02);
    if (schedule == "linear") {
      betas = at::linspace(start, end, train, at::kFloat);
    } else if (schedule == "scaled_linear") {
      betas = at::linspace(std::sqrt(start), std::sqrt(end), train, at::kFloat).pow(2);
    } else {  // Glide's cosine schedule, in Python floats (doubles), capped at 0.999
      auto alpha_bar = [](double t) { return std::pow(std::cos((t + 0.008) / 1.008 * M_PI / 2), 2); };
      std::vector<double> values;
      for (int64_t i = 0; i < train; ++i)
        values.push_back(std::min(1 - alpha_bar(double(i + 1) / train) / alpha_bar(double(i) / train), 0.999));
      betas = at::tensor(values, at::kDouble).to(at::kFloat);
    }
  }
  return at::cumprod(1 - betas, 0);
}

// Every constructor's first checks: the config's keys, then the step count against the training timesteps
// (returned).
int64_t checked_train_steps(const json& config, const std::string& cls, const Keys& keys, int steps) {
  check_keys(config, cls, keys);
  const int64_t train = config.value("num_train_timesteps", 1000);
  if (steps < 1) throw std::invalid_argument("steps=" + std::to_string(steps) + ": a generation needs 1 step or more");
  if (steps > train)
    throw std::invalid_argument("steps=" + std::to_string(steps) + " is more than the scheduler's " +
                                std::to_string(train) + " training timesteps");
  return train;
}

// numpy's round: halves to even (std::nearbyint in the default rounding mode).
double round_even(double x) { return std::nearbyint(x); }

// np.linspace(start, stop, n): i * ((stop - start) / (n - 1)) + start, the last value exactly stop.
std::vector<double> linspace(double start, double stop, int64_t n) {
  std::vector<double> out(n);
  const double step = n > 1 ? (stop - start) / double(n - 1) : 0.0;
  for (int64_t i = 0; i < n; ++i) out[i] = double(i) * step + start;
  if (n > 1) out[n - 1] = stop;
  return out;
}

// np.arange(start, 0, -step): ceil(start / step) values start + i * delta, where numpy's delta is the
// difference of its first two values.
std::vector<double> arange_down(double start, double step) {
  std::vector<double> out;
  const auto n = static_cast<int64_t>(std::ceil((0 - start) / -step));
  const double delta = (start + -step) - start;
  for (int64_t i = 0; i < n; ++i) out.push_back(start + double(i) * delta);
  return out;
}

at::Tensor int_tensor(const std::vector<double>& values) {
  std::vector<int64_t> ints(values.begin(), values.end());
  return at::tensor(ints, at::kLong);
}

std::vector<double> to_doubles(const at::Tensor& t) {
  auto d = t.to(at::kDouble).contiguous();
  return {d.data_ptr<double>(), d.data_ptr<double>() + d.numel()};
}

// sqrt((1 - a) / a) per training timestep, float32 as diffusers computes it, as doubles (numpy's view of it).
std::vector<double> train_sigmas(const at::Tensor& alphas_cumprod) {
  return to_doubles(((1 - alphas_cumprod) / alphas_cumprod).pow(0.5));
}

// np.interp(x, arange(n), fp).
double interp(double x, const std::vector<double>& fp) {
  const auto n = static_cast<int64_t>(fp.size());
  if (x <= 0) return fp.front();
  if (x >= double(n - 1)) return fp.back();
  const auto j = static_cast<int64_t>(std::floor(x));
  if (x == double(j)) return fp[j];
  return (fp[j + 1] - fp[j]) * (x - double(j)) + fp[j];
}

// Karras et al.'s sigmas (rho 7) from sigma_max down to sigma_min, as diffusers' _convert_to_karras.
std::vector<double> karras(double sigma_min, double sigma_max, int64_t n) {
  const double rho = 7.0, lo = std::pow(sigma_min, 1 / rho), hi = std::pow(sigma_max, 1 / rho);
  std::vector<double> out;
  for (double r : linspace(0, 1, n)) out.push_back(std::pow(hi + r * (lo - hi), rho));
  return out;
}

// The fractional training timestep of a sigma, by interpolation in log sigma (diffusers' _sigma_to_t; log_sigmas
// are float32 there, as np.log of a float32 array).
double sigma_to_t(double sigma, const std::vector<float>& log_sigmas) {
  const double log_sigma = std::log(std::max(sigma, 1e-10));
  const auto n = static_cast<int64_t>(log_sigmas.size());
  int64_t low = 0;
  for (int64_t i = 0; i < n; ++i)
    if (log_sigma - double(log_sigmas[i]) >= 0) low = i;
  low = std::min(low, n - 2);
  const double a = log_sigmas[low], b = log_sigmas[low + 1];
  const double w = std::clamp((a - log_sigma) / (a - b), 0.0, 1.0);
  return (1 - w) * double(low) + w * double(low + 1);
}

std::vector<float> log_of(const std::vector<double>& sigmas) {
  std::vector<float> out;
  for (double s : sigmas) out.push_back(std::log(float(s)));
  return out;
}

// ---------------------------------------------------------------------------------------------------------------

const Keys kDDIMKeys = {
    {"num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "clip_sample",
     "clip_sample_range", "set_alpha_to_one", "steps_offset", "prediction_type", "timestep_spacing"},
    {{"thresholding", false}, {"rescale_betas_zero_snr", false}},
    {"dynamic_thresholding_ratio", "sample_max_value"}};

class DDIM : public Scheduler {
 public:
  DDIM(const json& config, int steps) {
    train_ = checked_train_steps(config, "DDIMScheduler", kDDIMKeys, steps);
    steps_ = steps;
    alphas_cumprod_ = alphas_cumprod(config, "DDIMScheduler");
    final_alpha_cumprod_ = config.value("set_alpha_to_one", true) ? at::scalar_tensor(1.0, at::kFloat)
                                                                   : alphas_cumprod_[0];
    prediction_ = choice(config, "prediction_type", "epsilon", {"epsilon", "sample", "v_prediction"}, "DDIMScheduler");
    clip_ = config.value("clip_sample", true);
    clip_range_ = number(config, "clip_sample_range", 1.0);
    const auto spacing = choice(config, "timestep_spacing", "leading", {"leading", "trailing", "linspace"},
                                "DDIMScheduler");
    std::vector<double> t;
    if (spacing == "linspace") {
      t = linspace(0, double(train_ - 1), steps);
      for (auto& v : t) v = round_even(v);
      std::reverse(t.begin(), t.end());
    } else if (spacing == "leading") {
      const int64_t ratio = train_ / steps;
      for (int64_t i = steps - 1; i >= 0; --i) t.push_back(double(i * ratio));
      for (auto& v : t) v += config.value("steps_offset", 0);
    } else {
      for (double v : arange_down(double(train_), double(train_) / steps)) t.push_back(round_even(v) - 1);
    }
    timesteps_ = int_tensor(t);
  }

  at::Tensor step(const at::Tensor& model_output, int64_t index, const at::Tensor& sample) override {
    const int64_t t = timesteps_[index].item<int64_t>(), prev = t - train_ / steps_;
    auto alpha_t = alphas_cumprod_[t];
    auto alpha_prev = prev >= 0 ? alphas_cumprod_[prev] : final_alpha_cumprod_;
    auto beta_t = 1 - alpha_t;
    at::Tensor x0, eps;
    if (prediction_ == "epsilon") {
      x0 = (sample - beta_t.pow(0.5) * model_output) / alpha_t.pow(0.5);
      eps = model_output;
    } else if (prediction_ == "sample") {
      x0 = model_output;
      eps = (sample - alpha_t.pow(0.5) * x0) / beta_t.pow(0.5);
    } else {
      x0 = alpha_t.pow(0.5) * sample - beta_t.pow(0.5) * model_output;
      eps = alpha_t.pow(0.5) * model_output + beta_t.pow(0.5) * sample;
    }
    if (clip_) x0 = x0.clamp(-clip_range_, clip_range_);
    return alpha_prev.pow(0.5) * x0 + (1 - alpha_prev).pow(0.5) * eps;
  }

 private:
  int64_t train_ = 1000, steps_ = 1;
  at::Tensor alphas_cumprod_, final_alpha_cumprod_;
  std::string prediction_;
  bool clip_ = true;
  double clip_range_ = 1.0;
};

// Sigma-space samplers (Euler, DPM-Solver++) share the timestep spacings and the float32 sigma table.
struct SigmaSchedule {
  std::vector<double> timesteps, sigmas;  // sigmas has one more entry: the final sigma
};

const Keys kEulerKeys = {
    {"num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type",
     "interpolation_type", "use_karras_sigmas", "sigma_min", "sigma_max", "timestep_spacing", "timestep_type",
     "steps_offset", "final_sigmas_type"},
    {{"use_exponential_sigmas", false}, {"use_beta_sigmas", false}, {"rescale_betas_zero_snr", false}},
    {}};

class Euler : public Scheduler {
 public:
  Euler(const json& config, int steps) {
    const std::string cls = "EulerDiscreteScheduler";
    const int64_t train = checked_train_steps(config, cls, kEulerKeys, steps);
    choice(config, "interpolation_type", "linear", {"linear"}, cls);
    choice(config, "timestep_type", "discrete", {"discrete"}, cls);
    prediction_ = choice(config, "prediction_type", "epsilon", {"epsilon", "v_prediction", "sample"}, cls);
    const auto spacing = choice(config, "timestep_spacing", "linspace", {"linspace", "leading", "trailing"}, cls);
    const auto final_type = choice(config, "final_sigmas_type", "zero", {"zero", "sigma_min"}, cls);
    const auto ac = alphas_cumprod(config, cls);
    // The timesteps are float32 in diffusers, and the sigmas are interpolated at those float32 values.
    std::vector<double> t;
    if (spacing == "linspace") {
      t = linspace(0, double(train - 1), steps);
      std::reverse(t.begin(), t.end());
    } else if (spacing == "leading") {
      const int64_t ratio = train / steps;
      for (int64_t i = steps - 1; i >= 0; --i) t.push_back(double(i * ratio) + config.value("steps_offset", 0));
    } else {
      for (double v : arange_down(double(train), double(train) / steps)) t.push_back(round_even(v) - 1);
    }
    for (auto& v : t) v = float(v);
    const auto table = train_sigmas(ac);
    std::vector<double> sigmas;
    for (double v : t) sigmas.push_back(interp(v, table));
    if (config.value("use_karras_sigmas", false)) {
      sigmas = karras(number(config, "sigma_min", sigmas.back()), number(config, "sigma_max", sigmas.front()), steps);
      const auto logs = log_of(table);
      t.clear();
      for (double s : sigmas) t.push_back(float(sigma_to_t(s, logs)));
    }
    sigmas.push_back(final_type == "zero" ? 0.0 : table.front());
    sigmas_ = at::tensor(sigmas, at::kDouble).to(at::kFloat);
    timesteps_ = at::tensor(t, at::kDouble).to(at::kFloat);
    const auto max_sigma = sigmas_.max();
    init_sigma_ = (spacing == "leading" ? (max_sigma.pow(2) + 1).pow(0.5) : max_sigma).item<double>();
  }

  double init_noise_sigma() const override { return init_sigma_; }

  at::Tensor scale_model_input(const at::Tensor& sample, int64_t index) const override {
    return sample / (sigmas_[index].pow(2) + 1).pow(0.5);
  }

  at::Tensor step(const at::Tensor& model_output, int64_t index, const at::Tensor& in) override {
    const auto sample = in.to(at::kFloat);
    const auto sigma = sigmas_[index];
    at::Tensor x0;
    if (prediction_ == "epsilon") x0 = sample - sigma * model_output;
    else if (prediction_ == "sample") x0 = model_output;
    else x0 = model_output * (-sigma / (sigma.pow(2) + 1).pow(0.5)) + (sample / (sigma.pow(2) + 1));
    const auto derivative = (sample - x0) / sigma;
    return (sample + derivative * (sigmas_[index + 1] - sigma)).to(model_output.scalar_type());
  }

 private:
  at::Tensor sigmas_;
  double init_sigma_ = 1.0;
  std::string prediction_;
};

const Keys kDPMKeys = {
    {"num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "solver_order",
     "prediction_type", "algorithm_type", "solver_type", "lower_order_final", "euler_at_final", "use_karras_sigmas",
     "final_sigmas_type", "lambda_min_clipped", "timestep_spacing", "steps_offset"},
    {{"thresholding", false}, {"use_exponential_sigmas", false}, {"use_beta_sigmas", false},
     {"use_lu_lambdas", false}, {"use_flow_sigmas", false}, {"variance_type", nullptr},
     {"rescale_betas_zero_snr", false}, {"use_dynamic_shifting", false}},
    {"dynamic_thresholding_ratio", "sample_max_value", "flow_shift", "time_shift_type"}};

class DPMSolver : public Scheduler {
 public:
  DPMSolver(const json& config, int steps) {
    const std::string cls = "DPMSolverMultistepScheduler";
    const int64_t train = checked_train_steps(config, cls, kDPMKeys, steps);
    choice(config, "algorithm_type", "dpmsolver++", {"dpmsolver++"}, cls);
    order_ = config.value("solver_order", 2);
    if (order_ != 1 && order_ != 2)
      throw std::invalid_argument("scheduler config solver_order=" + std::to_string(order_) +
                                  " is not implemented by the C++ " + cls + " (it implements 1 and 2)");
    heun_ = choice(config, "solver_type", "midpoint", {"midpoint", "heun"}, cls) == "heun";
    prediction_ = choice(config, "prediction_type", "epsilon", {"epsilon", "sample", "v_prediction"}, cls);
    const auto spacing = choice(config, "timestep_spacing", "linspace", {"linspace", "leading", "trailing"}, cls);
    const auto final_type = choice(config, "final_sigmas_type", "zero", {"zero", "sigma_min"}, cls);
    const auto ac = alphas_cumprod(config, cls);
    // lambda_min_clipped: the last timestep whose log-SNR is above the clip.
    const auto lambda = at::log(ac.sqrt()) - at::log((1 - ac).sqrt());
    const auto clipped = at::searchsorted(lambda.flip(0), at::scalar_tensor(number(config, "lambda_min_clipped",
                                                                                   -INFINITY), at::kFloat));
    const int64_t last = train - clipped.item<int64_t>();
    std::vector<double> t;
    if (spacing == "linspace") {
      auto v = linspace(0, double(last - 1), steps + 1);
      for (int64_t i = steps; i >= 1; --i) t.push_back(round_even(v[i]));
    } else if (spacing == "leading") {
      const int64_t ratio = last / (steps + 1);
      for (int64_t i = steps; i >= 1; --i) t.push_back(double(i * ratio) + config.value("steps_offset", 0));
    } else {
      for (double v : arange_down(double(last), double(train) / steps)) t.push_back(round_even(v) - 1);
    }
    const auto table = train_sigmas(ac);
    std::vector<double> sigmas;
    if (config.value("use_karras_sigmas", false)) {
      sigmas = karras(table.front(), table.back(), steps);
      const auto logs = log_of(table);
      t.clear();
      const bool round = config.value("beta_schedule", std::string("linear")) != "squaredcos_cap_v2";
      for (double s : sigmas) t.push_back(round ? round_even(sigma_to_t(s, logs)) : sigma_to_t(s, logs));
    } else {
      for (double v : t) sigmas.push_back(interp(v, table));
    }
    // The last step is first order where diffusers makes it so (a second-order step before it stays second
    // order: lower_order_final's "second to last" rule only lowers third-order steps).
    last_first_order_ = config.value("euler_at_final", false) ||
                        (config.value("lower_order_final", true) && t.size() < 15) || final_type == "zero";
    sigmas.push_back(final_type == "zero" ? 0.0 : table.front());
    sigmas_ = at::tensor(sigmas, at::kDouble).to(at::kFloat);
    timesteps_ = int_tensor(t);
  }

  at::Tensor step(const at::Tensor& model_output, int64_t index, const at::Tensor& in) override {
    if (index != done_)
      throw std::logic_error("DPMSolverMultistepScheduler steps run in order: expected step " +
                             std::to_string(done_) + ", got " + std::to_string(index));
    const bool lower_final = index == size() - 1 && last_first_order_;
    const auto x0 = data_prediction(model_output, index, in);
    previous_ = latest_;
    latest_ = x0;
    const auto sample = in.to(at::kFloat);
    at::Tensor out;
    if (order_ == 1 || lower_orders_ < 1 || lower_final) {
      auto [alpha_t, sigma_t] = alpha_sigma(sigmas_[index + 1]);
      auto [alpha_s, sigma_s] = alpha_sigma(sigmas_[index]);
      const auto h = (at::log(alpha_t) - at::log(sigma_t)) - (at::log(alpha_s) - at::log(sigma_s));
      out = (sigma_t / sigma_s) * sample - (alpha_t * (at::exp(-h) - 1.0)) * x0;
    } else {
      auto [alpha_t, sigma_t] = alpha_sigma(sigmas_[index + 1]);
      auto [alpha_s0, sigma_s0] = alpha_sigma(sigmas_[index]);
      auto [alpha_s1, sigma_s1] = alpha_sigma(sigmas_[index - 1]);
      const auto lambda_t = at::log(alpha_t) - at::log(sigma_t);
      const auto lambda_s0 = at::log(alpha_s0) - at::log(sigma_s0);
      const auto lambda_s1 = at::log(alpha_s1) - at::log(sigma_s1);
      const auto h = lambda_t - lambda_s0, h0 = lambda_s0 - lambda_s1;
      const auto r0 = h0 / h;
      const auto& d0 = latest_;
      const auto d1 = (1.0 / r0) * (latest_ - previous_);
      if (heun_)
        out = (sigma_t / sigma_s0) * sample - (alpha_t * (at::exp(-h) - 1.0)) * d0 +
              (alpha_t * ((at::exp(-h) - 1.0) / h + 1.0)) * d1;
      else
        out = (sigma_t / sigma_s0) * sample - (alpha_t * (at::exp(-h) - 1.0)) * d0 -
              0.5 * (alpha_t * (at::exp(-h) - 1.0)) * d1;
    }
    if (lower_orders_ < order_) ++lower_orders_;
    ++done_;
    return out.to(model_output.scalar_type());
  }

 private:
  static std::pair<at::Tensor, at::Tensor> alpha_sigma(const at::Tensor& sigma) {
    auto alpha = 1 / (sigma.pow(2) + 1).pow(0.5);
    return {alpha, sigma * alpha};
  }

  at::Tensor data_prediction(const at::Tensor& model_output, int64_t index, const at::Tensor& sample) const {
    if (prediction_ == "sample") return model_output;
    auto [alpha_t, sigma_t] = alpha_sigma(sigmas_[index]);
    if (prediction_ == "epsilon") return (sample - sigma_t * model_output) / alpha_t;
    return alpha_t * sample - sigma_t * model_output;
  }

  at::Tensor sigmas_, latest_, previous_;
  int order_ = 2, lower_orders_ = 0;
  int64_t done_ = 0;
  bool heun_ = false, last_first_order_ = true;
  std::string prediction_;
};

// SD3's and Flux's sampler: the flow-matching Euler step x + (sigma_next - sigma) * v, with the fixed shift or the
// resolution-dependent one (use_dynamic_shifting: the pipeline's mu), custom sigmas as the pipelines pass them,
// without stochastic sampling. base_shift .. max_image_seq_len are the pipelines' (pipeline_sampling).
const Keys kFlowKeys = {
    {"num_train_timesteps", "shift", "use_dynamic_shifting", "time_shift_type", "base_shift", "max_shift",
     "base_image_seq_len", "max_image_seq_len"},
    {{"invert_sigmas", false}, {"shift_terminal", nullptr}, {"use_karras_sigmas", false},
     {"use_exponential_sigmas", false}, {"use_beta_sigmas", false}, {"stochastic_sampling", false}},
    {}};

class FlowMatchEuler : public Scheduler {
 public:
  FlowMatchEuler(const json& config, int steps, const TimestepOptions& options) {
    const std::string cls = "FlowMatchEulerDiscreteScheduler";
    const int64_t train = checked_train_steps(config, cls, kFlowKeys, steps);
    const double shift = number(config, "shift", 1.0);
    const bool dynamic = config.value("use_dynamic_shifting", false);
    const bool exponential = choice(config, "time_shift_type", "exponential", {"exponential", "linear"}, cls) ==
                             "exponential";
    if (dynamic && !options.mu)
      throw std::invalid_argument(cls + " with use_dynamic_shifting=true needs the pipeline's mu (its "
                                  "resolution-dependent shift), which this model's pipeline does not compute here: "
                                  "export with a fixed shift, or run this generation in Python");
    if (!options.sigmas.empty() && static_cast<int>(options.sigmas.size()) != steps)
      throw std::invalid_argument(std::to_string(options.sigmas.size()) + " custom sigmas for " +
                                  std::to_string(steps) + " steps: pass one per step");
    // time_shift(mu, 1, t) = m / (m + (1 / t - 1)) with m = exp(mu) (exponential) or mu (linear).
    const double m = !dynamic ? 0.0 : exponential ? std::exp(*options.mu) : *options.mu;
    at::Tensor f32;
    if (options.sigmas.empty()) {
      // __init__: the training sigmas t / train (t = train..1, float32 tensors), shifted unless the shift is
      // dynamic; their ends bound the inference schedule, which set_timesteps shifts (in numpy float64).
      const auto train_sigmas = at::arange(train, 0, -1, at::kFloat) / double(train);
      const auto shifted = dynamic ? train_sigmas : shift * train_sigmas / (1 + (shift - 1) * train_sigmas);
      const double sigma_max = shifted[0].item<double>(), sigma_min = shifted[train - 1].item<double>();
      std::vector<double> sigmas;
      for (double t : linspace(sigma_max * double(train), sigma_min * double(train), steps)) {
        const double s = t / double(train);
        sigmas.push_back(dynamic ? m / (m + (1 / s - 1)) : shift * s / (1 + (shift - 1) * s));
      }
      f32 = at::tensor(sigmas, at::kDouble).to(at::kFloat);
    } else {
      // Custom sigmas: numpy float32 from here on (NumPy casts the Python scalars to the array's float32).
      std::vector<float> sigmas;
      for (double given : options.sigmas) {
        const float s = static_cast<float>(given);
        const float e = static_cast<float>(m);
        sigmas.push_back(dynamic ? e / (e + (1.0f / s - 1.0f))
                                 : static_cast<float>(shift) * s / (1.0f + static_cast<float>(shift - 1) * s));
      }
      f32 = at::tensor(sigmas, at::kFloat);
    }
    timesteps_ = f32 * double(train);
    sigmas_ = at::cat({f32, at::zeros({1}, at::kFloat)});
  }

  at::Tensor step(const at::Tensor& model_output, int64_t index, const at::Tensor& in) override {
    const auto dt = sigmas_[index + 1] - sigmas_[index];
    return (in.to(at::kFloat) + dt * model_output).to(model_output.scalar_type());
  }

 private:
  at::Tensor sigmas_;
};

bool foreign(const std::string& key) {
  return own(kDDIMKeys, key) || own(kEulerKeys, key) || own(kDPMKeys, key) || own(kFlowKeys, key) ||
         key == "skip_prk_steps" || key == "variance_type";
}

// diffusers' calculate_shift (pipeline_flux.py, pipeline_stable_diffusion_3.py), in Python's float64; each pipeline
// has its own fallback for max_shift where the config lacks it (the config always holds it once diffusers wrote it).
double calculate_shift(const json& config, int64_t image_seq_len, double fallback_max_shift) {
  const double base_len = number(config, "base_image_seq_len", 256);
  const double max_len = number(config, "max_image_seq_len", 4096);
  const double base_shift = number(config, "base_shift", 0.5);
  const double max_shift = number(config, "max_shift", fallback_max_shift);
  const double m = (max_shift - base_shift) / (max_len - base_len);
  const double b = base_shift - m * base_len;
  return double(image_seq_len) * m + b;
}

}  // namespace

std::vector<std::string> scheduler_classes() {
  return {"DDIMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler", "FlowMatchEulerDiscreteScheduler"};
}

std::unique_ptr<Scheduler> make_scheduler(const json& config, int steps, const TimestepOptions& options) {
  const auto cls = config.value("_class_name", std::string());
  if (cls == "FlowMatchEulerDiscreteScheduler") return std::make_unique<FlowMatchEuler>(config, steps, options);
  if (!options.sigmas.empty() || options.mu)
    throw std::invalid_argument("this model's pipeline passes custom sigmas / mu to its sampler, which the C++ " +
                                (cls.empty() ? std::string("scheduler") : cls) + " does not take: use "
                                "FlowMatchEulerDiscreteScheduler, as the pipeline does");
  if (cls == "DDIMScheduler") return std::make_unique<DDIM>(config, steps);
  if (cls == "EulerDiscreteScheduler") return std::make_unique<Euler>(config, steps);
  if (cls == "DPMSolverMultistepScheduler") return std::make_unique<DPMSolver>(config, steps);
  std::string names;
  for (const auto& c : scheduler_classes()) names += (names.empty() ? "" : ", ") + c;
  throw std::invalid_argument("scheduler " + (cls.empty() ? std::string("config without _class_name") : cls) +
                              " is not implemented in C++ (it implements " + names +
                              "): export with one of them, e.g. scheduler=DDIMScheduler.from_config(pipe.scheduler.config)");
}

PipelineSampling pipeline_sampling(const std::string& model_class, const json& model_config,
                                   const json& scheduler_config, const std::vector<int64_t>& sample, int steps) {
  PipelineSampling out;
  if (model_class == "FluxTransformer2DModel") {
    // FluxPipeline.__call__: sigmas linspace(1, 1/N, N) (unless the config has use_flow_sigmas), mu from the
    // packed latents' tokens (a sampler without use_dynamic_shifting ignores it), timestep / 1000.
    if (sample.size() != 3)
      throw std::invalid_argument("a Flux export takes packed latents (batch, tokens, channels), not a rank-" +
                                  std::to_string(sample.size()) + " sample");
    if (!scheduler_config.value("use_flow_sigmas", false)) out.timesteps.sigmas = linspace(1.0, 1.0 / steps, steps);
    out.timesteps.mu = calculate_shift(scheduler_config, sample[1], 1.15);
    out.timestep_divisor = 1000;
  } else if (model_class == "SD3Transformer2DModel" && sample.size() == 4 &&
             scheduler_config.value("use_dynamic_shifting", false)) {
    // StableDiffusion3Pipeline.__call__: mu from (height // patch) * (width // patch) of the latents.
    const int64_t patch = model_config.value("patch_size", 2);
    out.timesteps.mu = calculate_shift(scheduler_config, (sample[2] / patch) * (sample[3] / patch), 1.16);
  }
  return out;
}

json parse_scheduler_config(const std::string& text) {
  std::string out;
  bool in_string = false;
  for (size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (in_string) {
      out += c;
      if (c == '\\' && i + 1 < text.size()) out += text[++i];
      else if (c == '"') in_string = false;
      continue;
    }
    if (c == '"') in_string = true;
    bool replaced = false;
    for (const char* word : {"-Infinity", "Infinity", "NaN"}) {
      if (text.compare(i, std::char_traits<char>::length(word), word) == 0) {
        out += std::string("\"") + word + "\"";
        i += std::char_traits<char>::length(word) - 1;
        replaced = true;
        break;
      }
    }
    if (!replaced) out += c;
  }
  return json::parse(out);
}

}  // namespace deepcache
