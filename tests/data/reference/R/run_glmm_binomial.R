# glmmTMB binomial (logit) on detection y > 0 with offset(log total) for the sim_binomial_detection fixture.
# Usage: Rscript run_glmm_binomial.R DATADIR   (writes glmmTMB_binomial_ML.csv and glmmTMB_binomial_REML.csv there)
# Model: (y > 0) ~ condition + (1|donor) + (1|batch) + offset(log(total)), family = binomial, Laplace;
# ML (glmmTMB's default) and REML = TRUE.
suppressPackageStartupMessages({library(Matrix); library(glmmTMB)})
dir <- commandArgs(TRUE)[1]
Y <- as(Matrix::readMM(gzfile(file.path(dir, "counts.mtx.gz"))), "CsparseMatrix")  # cells x genes
obs <- read.csv(file.path(dir, "obs.csv"), stringsAsFactors = FALSE)
genes <- read.csv(file.path(dir, "truth.csv"), stringsAsFactors = FALSE)$gene
df <- data.frame(donor = factor(obs$donor), batch = factor(obs$batch),
                 condition = factor(obs$condition, levels = c("ctrl", "case")), lo = log(obs$total))

fit_one <- function(reml) {
  fit <- glmmTMB(det ~ condition + (1 | donor) + (1 | batch) + offset(lo), data = df, family = binomial,
                 REML = reml)
  cf <- summary(fit)$coefficients$cond
  vc <- VarCorr(fit)$cond
  ok <- isTRUE(fit$sdr$pdHess) && fit$fit$convergence == 0
  c(coef_intercept = cf["(Intercept)", 1], se_intercept = cf["(Intercept)", 2],
    coef = cf["conditioncase", 1], se = cf["conditioncase", 2], p = cf["conditioncase", 4],
    var_donor = vc$donor[1], var_batch = vc$batch[1], loglik = as.numeric(logLik(fit)), ok = ok)
}

for (reml in c(FALSE, TRUE)) {
  rows <- list()
  t0 <- proc.time()[["elapsed"]]
  for (j in seq_along(genes)) {
    df$det <- as.numeric(Y[, j] > 0)
    w <- FALSE
    r <- tryCatch(withCallingHandlers(fit_one(reml), warning = function(e) {w <<- TRUE; invokeRestart("muffleWarning")}),
                  error = function(e) NULL)
    if (is.null(r)) next
    rows[[j]] <- data.frame(gene = genes[j], t(r), warned = w)
  }
  res <- do.call(rbind, rows)
  res$ok <- as.logical(res$ok)
  out <- file.path(dir, sprintf("glmmTMB_binomial_%s.csv", if (reml) "REML" else "ML"))
  write.csv(res, out, row.names = FALSE)
  message(sprintf("%s: %d of %d genes fitted, %d warned or not ok, %.1f s", basename(out), nrow(res), length(genes),
                  sum(res$warned | !res$ok), proc.time()[["elapsed"]] - t0))
}
