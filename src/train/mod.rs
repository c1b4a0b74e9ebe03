//! Training: losses over token batches, the Adam optimizer with its resumable state, SVF expert
//! training (stage 2: SFT or REINFORCE + KL, DESIGN.md §3) and pretraining a BitNet model from
//! scratch (how the embedded default model was made).

pub mod expert;
pub mod loss;
pub mod optim;
pub mod presets;
pub mod pretrain;

pub use expert::{
    lr_at, train_expert, train_expert_on, Objective, StepStats, TrainConfig, TrainSummary,
    DEFAULT_RANK,
};
pub use presets::{PretrainOverrides, TrainOverrides};
