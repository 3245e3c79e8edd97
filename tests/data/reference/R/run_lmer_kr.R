# Kenward-Roger tests of a precision-weighted LMM (dream's per-gene model) with lmerTest/pbkrtest.
# Usage: Rscript run_lmer_kr.R DIR   (reads DIR/logcpm.csv, DIR/weights.csv, DIR/samples.csv; writes DIR/lmer_kr.csv)
# Per gene: lmer(y ~ condition + (1|batch), weights = w, REML = TRUE), summary(fit, ddf = "Kenward-Roger").
# pbkrtest 0.5.2 builds the marginal covariance from the variance components without the weights (residual part
# sigma^2 I instead of sigma^2 diag(1/w)); columns *_naive hold that output as lmerTest reports it. The weighted
# model is also fitted in its equivalent unweighted form (y, X and Z multiplied by sqrt(w): random slope on sqrt(w)
# within batch, no intercept), for which pbkrtest's covariance is exact: columns coef, se, df, t, p.
suppressPackageStartupMessages({library(lme4); library(lmerTest)})
dir <- commandArgs(TRUE)[1]
E <- as.matrix(read.csv(file.path(dir, "logcpm.csv"), row.names = 1, check.names = FALSE))
W <- as.matrix(read.csv(file.path(dir, "weights.csv"), row.names = 1, check.names = FALSE))
s <- read.csv(file.path(dir, "samples.csv"), row.names = 1)
s$condition <- factor(s$condition, levels = c("ctrl", "case")); s$batch <- factor(s$batch)
stopifnot(identical(colnames(E), rownames(s)))
ctl <- lmerControl(check.conv.singular = "ignore")
rows <- lapply(rownames(E), function(g) {
  d <- s; d$y <- E[g, ]; d$w <- W[g, ]
  f0 <- lmer(y ~ condition + (1 | batch), data = d, weights = w, REML = TRUE, control = ctl)
  c0 <- summary(f0, ddf = "Kenward-Roger")$coefficients["conditioncase", ]
  d$sw <- sqrt(d$w); d$ys <- d$y * d$sw; d$x0 <- d$sw; d$x1 <- d$sw * (d$condition == "case")
  f1 <- lmer(ys ~ 0 + x0 + x1 + (0 + sw | batch), data = d, REML = TRUE, control = ctl)
  c1 <- summary(f1, ddf = "Kenward-Roger")$coefficients["x1", ]
  data.frame(gene = g, coef = c1[1], se = c1[2], df = c1[3], t = c1[4], p = c1[5],
             var_batch = as.data.frame(VarCorr(f1))$vcov[1], sigma2 = sigma(f1)^2,
             coef_naive = c0[1], se_naive = c0[2], df_naive = c0[3], t_naive = c0[4], p_naive = c0[5],
             var_batch_naive = as.data.frame(VarCorr(f0))$vcov[1])
})
out <- do.call(rbind, rows)
write.csv(out, file.path(dir, "lmer_kr.csv"), row.names = FALSE, quote = FALSE)
cat("genes:", nrow(out), " max |coef - coef_naive|:", max(abs(out$coef - out$coef_naive)), "\n")
