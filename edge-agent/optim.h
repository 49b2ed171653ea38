#pragma once
// Gradient clipping and the AdamW update over the LoRA tensors, each one pass
// per tensor instead of libtorch's 2 (clip) and ~9 (AdamW) ops per tensor.
// An adapter on 7 projections of 30 layers is 420 small tensors: op dispatch,
// not arithmetic, is what the libtorch versions spend their time on.
//
// Contract (tests/edge/optim_test.cc compares both with libtorch's over
// several steps):
//  * ClipGradNorm(params, max_norm) == torch::nn::utils::clip_grad_norm_
//    (L2 norm over all defined gradients, coefficient max_norm / (norm +
//    1e-6) applied when below 1), returning the norm before clipping. The
//    squares are summed in double (libtorch: float per tensor).
//  * AdamWStep(opt) makes the update torch::optim::AdamW::step() makes
//    (decoupled weight decay, bias-corrected moments, the same op order in
//    float) and keeps its state in the same place, the same way: the
//    optimizer's AdamWParamState per parameter (created on first use, keyed
//    as libtorch keys it, AdamStateKey), so checkpoints and opt.step() can be
//    mixed with it. Parameters without a gradient are skipped. When amsgrad
//    is set, or any parameter, gradient or state is not a contiguous fp32 CPU
//    tensor, it calls opt.step() instead.
//  * Both run the tensors in parallel on libtorch's threads.
#include <torch/torch.h>

#include <string>
#include <vector>

namespace fedlora::edge {

double ClipGradNorm(const std::vector<torch::Tensor>& params, double max_norm);
void AdamWStep(torch::optim::AdamW& opt);
std::string AdamStateKey(const torch::Tensor& param);

}  // namespace fedlora::edge
