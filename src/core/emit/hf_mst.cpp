// hf-mst: mst_config.json, the plan as python/mst_hf reads it to patch a
// transformers model (MsT MLP and LM-head chunking, checkpoint placement, offload)
// and set up its optimizer and parallelism. Schema "hf-mst/1", owned by this
// project; every knob of the plan has a field. It refuses what python/mst_hf.apply refuses.
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "emit/emitters.hpp"
#include "mst/error.hpp"

namespace mst::emit_detail {

void check_hf_mst(const TrainingSetup& s, const ModelSpec& model) {
    // mst_hf/config.py: its fp32 master weights and its step in backward take each gradient in a
    // hook, before plain DDP (ZeRO 0) has reduced it.
    if (s.dp > 1 && s.zero_stage == 0 && s.precision == Precision::Bf16Master)
        fail("hf-mst", "setup.precision",
             "expected pure-bf16 or amp with data_parallel > 1 and zero_stage 0 (python/mst_hf's fp32 master weights would "
             "step on gradients DDP has not reduced), got bf16-master");
    if (s.dp > 1 && s.zero_stage == 0 && s.optimizer_in_backward)
        fail("hf-mst", "setup.optimizer_in_backward",
             "expected false with data_parallel > 1 and zero_stage 0 (a step in backward would use gradients DDP has not "
             "reduced), got true");
    // mst_hf/patch.py _check_lm_head: under ZeRO-3 the chunked loss runs inside lm_head's forward (where
    // DeepSpeed has its weight gathered) and is returned as lm_head's output, which a soft-capping
    // model's forward would then change.
    if (s.zero_stage == 3 && !s.fsdp2 && s.lm_chunks > 1 && model.final_logit_softcapping)
        fail("hf-mst", "setup.lm_chunks",
             fmt::format("expected 1 with zero_stage 3 for {} (python/mst_hf runs the chunked loss inside lm_head's "
                         "forward under ZeRO-3, and this model's forward soft-caps that output: "
                         "final_logit_softcapping {}), got {}",
                         model.name, *model.final_logit_softcapping, s.lm_chunks));
}

std::vector<EmittedFile> emit_hf_mst(const Plan& plan, const ModelSpec& model) {
    const TrainingSetup& s = plan.setup;
    check_hf_mst(s, model);
    // ordered_json keeps the schema's field order, so a person reads the file top-down
    // in the same order as the documentation.
    nlohmann::ordered_json j = {
        {"format", "hf-mst/1"},
        {"model", plan.model},
        {"seq_len", s.seq_len},
        {"micro_batch", s.micro_batch},
        {"grad_accum", s.grad_accum},
        {"precision", to_string(s.precision)},
        {"attention", to_string(s.attention)},
        {"mlp", {{"chunks", s.mlp_chunks}, {"impl", to_string(s.mlp_impl)}}},
        {"lm_head", {{"chunks", s.lm_chunks}, {"impl", to_string(s.lm_impl)}}},
        {"checkpoint_layers", checkpoint_layers(s)},
        {"offload_checkpoints", s.offload_checkpoints},
        {"optimizer",
         {{"name", to_string(s.optimizer)},
          {"state_dtype", to_string(s.effective_state_dtype())},
          {"in_backward", s.optimizer_in_backward},
          {"impl", to_string(s.optimizer_impl)}}},
        {"data_parallel", s.dp},
        {"sequence_parallel", s.sp},
        {"zero_stage", s.zero_stage},
        {"predicted",
         {{"peak_allocated_bytes", plan.prediction.peak_allocated_bytes},
          {"peak_reserved_bytes", plan.prediction.peak_reserved_bytes},
          {"tokens_per_second", plan.prediction.tokens_per_second}}},
    };
    // ZeRO-3 as torch's FSDP2: python/mst_hf patches as for one GPU (its parameters are plain ones while a
    // layer runs), and the user's script applies fully_shard to every decoder layer and the model.
    if (s.fsdp2) j["fsdp2"] = true;
    if (s.fsdp2_no_sync) j["fsdp2_no_sync"] = true;  // (what the user's loop does: the referee runs it so)
    if (!s.fsdp2_reshard_after_forward) j["fsdp2_reshard_after_forward"] = false;  // (mst_hf.shard's layers)
    if (s.fsdp2_groups != Fsdp2Groups::MstHf) j["fsdp2_groups"] = to_string(s.fsdp2_groups);  // (mst_hf.shard refuses it)
    return {{"mst_config.json", j.dump(2) + "\n"}};
}

}  // namespace mst::emit_detail
